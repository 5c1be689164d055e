"""Walking a draft tree in the tests (``parents[i]`` is node i's parent, -1 at the root 0)."""


def node_path(parents, node: int) -> list[int]:
    """The nodes from the root's child down to ``node`` (empty for the root)."""
    out = []
    while node > 0:
        out.append(node)
        node = parents[node]
    return out[::-1]

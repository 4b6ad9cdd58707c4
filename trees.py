"""Nested dicts, tuples and lists of tensors ("trees"): the shape of a run's
state, of a population's stacked state and of the outer variables of a
hypergradient. ``None`` is a leaf."""


def tree_map(function, tree, *rest):
    """``function`` over the leaves of ``tree`` (and the matching leaves of ``rest``)."""
    if isinstance(tree, dict):
        return {key: tree_map(function, value, *(r[key] for r in rest))
                for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(tree_map(function, *parts) for parts in zip(tree, *rest))
    return function(tree, *rest)


def tree_leaves(tree):
    leaves = []
    tree_map(lambda leaf: leaves.append(leaf), tree)
    return leaves


def tree_add(tree, other):
    """Leafwise ``tree + other``."""
    return tree_map(lambda a, b: a + b, tree, other)

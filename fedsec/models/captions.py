"""The pretraining captions of the embedded CLIP.

Version 1 (``fedsec-tiny-clip``): the captions describe Fashion-MNIST classes
with synonyms and never use the canonical class names (or their word pieces
such as "shirt", "coat", "boot", "bag"), so a hand-written zero-shot prompt
with the canonical names is near chance.

Version 2 (``fedsec-tiny-clip-v2``): a fixed share of every class's captions
use the canonical class name (:data:`CANONICAL_NAMES`), the rest the synonyms.
The model then knows the label words, but only loosely, as real CLIP does on a
hard dataset: zero-shot with ``a photo of a {}.`` is well above chance and a
learned (shared) prompt context still adds a lot. :func:`caption_pool` builds
the per-class caption pool; pretraining draws captions uniformly from it.
"""

from __future__ import annotations

from fedsec.data.datasets import FASHION_MNIST_CLASSES

TEMPLATES = [
    "a photo of a {}.",
    "a picture of the {}.",
    "a grayscale image of a {}.",
    "a product photo of a {}.",
    "a low resolution photo of a {}.",
    "a {} on a black background.",
    "an item of clothing: {}.",
    "a catalogue image of a {}.",
    "a small photo of a {}.",
    "a centered photo of a {}.",
    "this is a {}.",
    "a blurry photo of a {}.",
    "a close-up of a {}.",
    "a black and white photo of a {}.",
    "a picture of a nice {}.",
    "a photo of my {}.",
]

#: Ten synonyms per Fashion-MNIST class, in label order.
SYNONYMS = [
    [
        "tee",
        "short-sleeve top",
        "crew neck tee",
        "cotton tee",
        "jersey top",
        "graphic tee",
        "casual top",
        "short sleeved jersey",
        "tank top",
        "plain tee",
    ],
    ["pants", "slacks", "jeans", "chinos", "leggings", "long pants", "denim jeans", "joggers", "khakis", "breeches"],
    [
        "sweater",
        "jumper",
        "knit sweater",
        "cardigan",
        "hoodie",
        "sweatshirt",
        "woolly jumper",
        "knitwear",
        "turtleneck",
        "fleece sweater",
    ],
    [
        "gown",
        "frock",
        "sun frock",
        "evening gown",
        "cocktail frock",
        "summer gown",
        "one-piece gown",
        "wrap frock",
        "ball gown",
        "long gown",
    ],
    [
        "jacket",
        "parka",
        "blazer",
        "anorak",
        "windbreaker",
        "trench jacket",
        "puffer jacket",
        "winter jacket",
        "down jacket",
        "rain jacket",
    ],
    [
        "flip-flops",
        "slippers",
        "open-toe shoes",
        "strappy shoes",
        "slides",
        "espadrilles",
        "summer footwear",
        "beach shoes",
        "gladiator shoes",
        "open sandshoes",
    ],
    [
        "blouse",
        "button-down",
        "collared top",
        "flannel",
        "polo",
        "oxford button-up",
        "long sleeve blouse",
        "checkered flannel",
        "tunic",
        "work blouse",
    ],
    [
        "trainers",
        "running shoes",
        "athletic shoes",
        "tennis shoes",
        "kicks",
        "sports shoes",
        "gym shoes",
        "low-top trainers",
        "canvas shoes",
        "jogging shoes",
    ],
    ["purse", "tote", "backpack", "satchel", "clutch", "briefcase", "rucksack", "shoulder purse", "duffel", "pouch"],
    [
        "chelsea footwear",
        "lace-up leather shoes",
        "combat footwear",
        "hiking shoes",
        "winter footwear",
        "heeled leather shoes",
        "western footwear",
        "work footwear",
        "desert shoes",
        "suede high shoes",
    ],
]


#: The canonical Fashion-MNIST class names (as :mod:`fedsec.data` names them), in label order.
CANONICAL_NAMES = list(FASHION_MNIST_CLASSES)


def synonym_captions(class_index: int) -> list[str]:
    """Every ``template x synonym`` caption of one class (the v1 pool), template-major.

    Parameters
    ----------
    class_index : int
        Fashion-MNIST label.
    """
    return [t.format(s) for t in TEMPLATES for s in SYNONYMS[class_index]]


def caption_pool(
    class_index: int,
    canonical_share: float = 0.0,
    pool_size: int = len(TEMPLATES) * 10,
    seed: int = 0,
    canonical_names: list[str] | None = None,
) -> list[str]:
    """The caption pool of one class; pretraining samples captions uniformly from it.

    ``round(canonical_share * pool_size)`` entries use the canonical class name
    (cycling through :data:`TEMPLATES` from a seeded offset), the others are
    synonym captions: a seeded choice among the 160 ``template x synonym``
    combinations, all of them (each as often, give or take one) when the pool
    needs more than 160. With ``canonical_share=0`` and the default
    ``pool_size`` the pool is exactly the v1 pool, in v1's order.

    Parameters
    ----------
    class_index : int
        Fashion-MNIST label.
    canonical_share : float
        Share of the pool that uses the canonical name, in ``[0, 1]``.
    pool_size : int
        Entries per class; a larger pool allows a finer share (1 / ``pool_size``).
    seed : int
        Seed of the choice of synonym captions and of the template offset.
    canonical_names : list of str, optional
        Override of :data:`CANONICAL_NAMES`.

    Returns
    -------
    list of str
        ``pool_size`` captions; canonical ones first.

    Raises
    ------
    ValueError
        If ``canonical_share`` is outside ``[0, 1]`` or ``pool_size`` < 1.
    """
    if not 0.0 <= canonical_share <= 1.0:
        raise ValueError(f"canonical_share must lie in [0, 1], got {canonical_share}")
    if pool_size < 1:
        raise ValueError(f"pool_size must be positive, got {pool_size}")
    names = canonical_names or CANONICAL_NAMES
    synonyms = synonym_captions(class_index)
    n_canonical = int(round(canonical_share * pool_size))
    n_synonym = pool_size - n_canonical
    if n_canonical == 0 and n_synonym == len(synonyms):
        return synonyms
    import numpy as np

    rng = np.random.default_rng([seed, class_index])
    offset = int(rng.integers(len(TEMPLATES)))
    canonical = [TEMPLATES[(offset + i) % len(TEMPLATES)].format(names[class_index]) for i in range(n_canonical)]
    reps = max(1, -(-n_synonym // len(synonyms)))  # ceil
    order = np.concatenate([rng.permutation(len(synonyms)) for _ in range(reps)])[:n_synonym]
    return canonical + [synonyms[i] for i in np.sort(order)]


def uses_canonical_name(caption: str, class_index: int, canonical_names: list[str] | None = None) -> bool:
    """Whether ``caption`` is a canonical-name caption of ``class_index`` (a template filled with its name)."""
    name = (canonical_names or CANONICAL_NAMES)[class_index]
    return any(caption == t.format(name) for t in TEMPLATES)

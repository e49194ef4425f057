"""The pretraining captions of the embedded CLIP.

The captions describe Fashion-MNIST classes with synonyms and never use the
canonical class names (or their word pieces such as "shirt", "coat", "boot",
"bag"), so a hand-written zero-shot prompt with the canonical names is only
loosely aligned with the images. That leaves room for prompt learning, as on
real CLIP and hard datasets: the learned context must find where the classes
lie in text-embedding space.
"""

from __future__ import annotations

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
    ["tee", "short-sleeve top", "crew neck tee", "cotton tee", "jersey top",
     "graphic tee", "casual top", "short sleeved jersey", "tank top", "plain tee"],
    ["pants", "slacks", "jeans", "chinos", "leggings",
     "long pants", "denim jeans", "joggers", "khakis", "breeches"],
    ["sweater", "jumper", "knit sweater", "cardigan", "hoodie",
     "sweatshirt", "woolly jumper", "knitwear", "turtleneck", "fleece sweater"],
    ["gown", "frock", "sun frock", "evening gown", "cocktail frock",
     "summer gown", "one-piece gown", "wrap frock", "ball gown", "long gown"],
    ["jacket", "parka", "blazer", "anorak", "windbreaker",
     "trench jacket", "puffer jacket", "winter jacket", "down jacket", "rain jacket"],
    ["flip-flops", "slippers", "open-toe shoes", "strappy shoes", "slides",
     "espadrilles", "summer footwear", "beach shoes", "gladiator shoes", "open sandshoes"],
    ["blouse", "button-down", "collared top", "flannel", "polo",
     "oxford button-up", "long sleeve blouse", "checkered flannel", "tunic", "work blouse"],
    ["trainers", "running shoes", "athletic shoes", "tennis shoes", "kicks",
     "sports shoes", "gym shoes", "low-top trainers", "canvas shoes", "jogging shoes"],
    ["purse", "tote", "backpack", "satchel", "clutch",
     "briefcase", "rucksack", "shoulder purse", "duffel", "pouch"],
    ["chelsea footwear", "lace-up leather shoes", "combat footwear", "hiking shoes", "winter footwear",
     "heeled leather shoes", "western footwear", "work footwear", "desert shoes", "suede high shoes"],
]

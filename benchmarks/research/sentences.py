"""The templated sentences of the MiniLM tasks, shared by the research
scripts: movie and restaurant reviews (their adjectives split into
training, validation and test words) and off-topic sentences."""

import itertools

import numpy as np

MOVIE_SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the ending"]
FOOD_SUBJECTS = [
    "the soup",
    "the service",
    "this restaurant",
    "the dessert",
    "the waiter",
]
TEMPLATES = [
    "{s} was {a}.",
    "i thought {s} was {a}.",
    "honestly, {s} felt {a}.",
    "{s} is really {a}!",
]
ADJECTIVES = {
    "adapt": {
        1: ["great", "wonderful", "excellent", "lovely"],
        0: ["awful", "terrible", "boring", "horrible"],
    },
    "val": {1: ["amazing", "enjoyable", "fine"], 0: ["bad", "poor", "weak"]},
    "test": {
        1: ["superb", "delightful", "fantastic", "brilliant", "charming"],
        0: ["dreadful", "dull", "disappointing", "tedious", "mediocre"],
    },
}
OFF_TOPIC_SUBJECTS = [
    "the train to the airport",
    "the meeting",
    "the bus",
    "the bakery",
    "the router",
    "the library",
    "the recipe",
    "the parking lot",
]
OFF_TOPIC_PREDICATES = [
    "leaves at seven",
    "has moved to the third floor",
    "needs two cups of flour",
    "restarts every night",
    "opens on monday",
    "is next to the station",
]
OFF_TOPIC_TEMPLATES = ["{s} {p}.", "i heard that {s} {p}."]


def sentences(subjects, words):
    texts, labels = [], []
    for label, adjectives in words.items():
        for t, s, a in itertools.product(TEMPLATES, subjects, adjectives):
            texts.append(t.format(s=s, a=a))
            labels.append(label)
    return texts, np.array(labels, dtype="int32")

"""Sampled generations of a PVeRA-adapted KerasHub causal LM.

Everything is made here, offline: a word-level GPT-2 byte-pair tokenizer
from an in-memory vocabulary and merges, and a tiny
`keras_hub.models.GPT2CausalLM` (2 layers, width 64, random weights).

1. A stand-in for pretraining: the whole model trains on made-up facts
   written as sentences ("the capital of france is paris.") and on
   question -> answer lines about colours ("Q: what colour is the snow? A:
   white"). It learns the facts, but has never seen a question about a
   capital.
2. PVeRA (rank 32, every dense layer; only the PVeRA vectors train) teaches
   it to answer "Q: what is the capital of france? A: paris", for every
   country but one (peru).
3. `keras_pvera.generate_with_uncertainty` generates each prompt `samples`
   times with the adapters' sampling on: every generation draws the
   adapters' latent code afresh at each step of KerasHub's cached loop. The
   sampler is greedy, so only PVeRA's noise differs between generations,
   and their spread is a Monte Carlo answer consistency. The example
   prints, for a question taught to the adapter, one it was never taught
   (whose fact the base learned as a sentence) and one about a country no
   training line mentions, the generations, how often the most common
   answer came up (agreement), how many distinct answers there were, and
   the mean entropy and mutual information of the generated tokens.

    KERAS_BACKEND=torch python examples/causal_lm_sampling.py
"""

import argparse
import collections
import os
import re
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The model is tiny: one thread per operation is as fast, and on shared
# cores torch's OpenMP threads, waiting on each other, made it 3x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import keras  # noqa: E402

import keras_pvera  # noqa: E402

CAPITALS = {
    "france": "paris",
    "spain": "madrid",
    "italy": "rome",
    "japan": "tokyo",
    "egypt": "cairo",
    "peru": "lima",
}
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black"}
HELD_OUT = "peru"  # Its capital is stated in pretraining, never asked.
UNKNOWN = "germany"  # In the vocabulary, in no training line.
CAPITAL_QUESTIONS = [
    "what is the capital of {x}?",
    "name the capital of {x}.",
    "which city is the capital of {x}?",
]
COLOUR_QUESTIONS = [
    "what colour is the {x}?",
    "name the colour of the {x}.",
    "which colour is the {x}?",
]
PROMPTS = {
    "taught to the adapter": "what is the capital of france?",
    "fact known, question never taught": f"what is the capital of {HELD_OUT}?",
    "country never in training": f"what is the capital of {UNKNOWN}?",
}
SEQUENCE_LENGTH = 16


def question_lines(questions, facts):
    return [
        f"Q: {question.format(x=subject)} A: {answer}"
        for question in questions
        for subject, answer in facts.items()
    ]


def pretraining_lines():
    """Facts as sentences, and question -> answer lines about colours."""
    lines = []
    for country, city in CAPITALS.items():
        lines += [
            f"the capital of {country} is {city}.",
            f"{city} is the capital of {country}.",
            f"{city} is a city.",
        ]
    for thing, colour in COLOURS.items():
        lines += [
            f"the colour of the {thing} is {colour}.",
            f"the {thing} is {colour}.",
        ]
    return lines + question_lines(COLOUR_QUESTIONS, COLOURS)


def adapter_lines():
    """Question -> answer lines about capitals, but not the held-out one."""
    taught = {c: city for c, city in CAPITALS.items() if c != HELD_OUT}
    return question_lines(CAPITAL_QUESTIONS, taught)


def word_tokenizer(lines):
    """A GPT-2 byte-pair tokenizer holding each word of `lines` as one token.

    Each word, with GPT-2's leading-space marker `Ġ`, gets the chain of
    merges that builds it from its first letter; single characters (and so
    any other word, spelled out) are in the vocabulary too.
    """
    import keras_hub

    # GPT-2's tokenizer pads with id 0: that must not be the end token.
    vocabulary = {"!": 0, "<|endoftext|>": 1}
    merges = []
    for character in "Ġ?.:AQabcdefghijklmnopqrstuvwxyz":
        vocabulary.setdefault(character, len(vocabulary))
    # Words are runs of letters: punctuation stays a token of its own, as
    # GPT-2's pre-tokenizer splits it off.
    words = sorted({w for line in lines for w in re.findall("[a-zA-Z]+", line)})
    for word in words:
        token = "Ġ"
        for character in word:
            merge = f"{token} {character}"
            if merge not in merges:
                merges.append(merge)
            token += character
            vocabulary.setdefault(token, len(vocabulary))
    return keras_hub.models.GPT2Tokenizer(vocabulary=vocabulary, merges=merges)


def build_causal_lm(tokenizer):
    """A tiny GPT-2 causal LM with random weights, taking raw strings."""
    import keras_hub

    preprocessor = keras_hub.models.GPT2CausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        num_layers=2,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=128,
        max_sequence_length=SEQUENCE_LENGTH,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)


class FitProgress(keras.callbacks.Callback):
    """One progress bar for a whole `fit`, advancing once an epoch.

    On a terminal it redraws in place; in a pipe or a log it prints one line
    when the fit ends.
    """

    def on_train_begin(self, logs=None):
        self.bar = keras.utils.Progbar(
            self.params["epochs"],
            verbose=1 if sys.stdout.isatty() else 2,
            stateful_metrics=["loss", "accuracy"],
            unit_name="epoch",
        )

    def on_epoch_end(self, epoch, logs=None):
        self.bar.update(epoch + 1, values=list((logs or {}).items()))


def compile_for_training(model, learning_rate):
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=["accuracy"],
    )


def answer_of(generation):
    """The first word after the last `A:` of a generated line."""
    words = generation.rsplit("A:", 1)[-1].replace("?", " ").replace(".", " ")
    return (words.split() or ["(nothing)"])[0]


def consistency(answers):
    """The most common answer, its share of `answers`, and distinct answers."""
    counts = collections.Counter(answers)
    most_common, count = counts.most_common(1)[0]
    return most_common, count / len(answers), len(counts)


def main(samples=10, seed=0, steps=(600, 400)):
    """Pretrains, adapts, samples; returns the printed figures.

    Args:
        samples: Sampled generations per prompt.
        seed: Seed of the weights, the data order and the PVeRA noise.
        steps: Training steps (batches of 8) of pretraining and of PVeRA.

    Returns:
        A dict: `"pretraining accuracy"` and `"adapter accuracy"` (next-token
        accuracy in the last epoch), `"trainable"` and `"total"` (parameter
        counts), and per prompt kind (the keys of `PROMPTS`) a dict with
        `"sampling off"`, `"answers"`, `"most common"`, `"agreement"` and
        `"distinct"` (of the answers, their first words), and
        `"generation agreement"` (of whole generations) and
        `"mutual information"` (per generated token, in nats).
    """
    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    base_lines, taught_lines = pretraining_lines(), adapter_lines()
    tokenizer = word_tokenizer(base_lines + taught_lines + [UNKNOWN])
    causal_lm = build_causal_lm(tokenizer)

    def fit(model, lines, total_steps):
        epochs = 4
        repeats = max(1, round(total_steps * 8 / epochs / len(lines)))
        # KerasHub makes a `tf.data` pipeline of the strings, which `fit`
        # does not shuffle: say so rather than be warned.
        history = model.fit(
            lines * repeats,
            epochs=epochs,
            batch_size=8,
            shuffle=False,
            verbose=0,
            callbacks=[FitProgress()],
        )
        return history.history["accuracy"][-1]

    compile_for_training(causal_lm, 3e-3)
    figures = {"pretraining accuracy": fit(causal_lm, base_lines, steps[0])}
    print(
        f"pretrained a tiny GPT-2 ({causal_lm.count_params():,} parameters) on "
        f"{len(base_lines)} lines such as {base_lines[0]!r}: next-token "
        f"accuracy {figures['pretraining accuracy']:.3f}"
    )

    model = keras_pvera.apply(causal_lm, rank=32, target="all", seed=seed)
    compile_for_training(model, 3e-2)
    trainable, total = model.parameter_counts()
    figures["trainable"], figures["total"] = trainable, total
    figures["adapter accuracy"] = fit(model, taught_lines, steps[1])
    print(
        f"PVeRA on {len(model.adapted_layers)} layers ({trainable:,} of "
        f"{total:,} parameters train), {len(taught_lines)} lines such as "
        f"{taught_lines[0]!r}: next-token accuracy "
        f"{figures['adapter accuracy']:.3f}"
    )

    causal_lm.compile(sampler="greedy")  # Only PVeRA's noise varies.
    prompts = {kind: f"Q: {question} A:" for kind, question in PROMPTS.items()}
    off = model.generate(list(prompts.values()))  # Sampling off: the mean.
    result = keras_pvera.generate_with_uncertainty(
        model, list(prompts.values()), n=samples, seed=seed
    )
    for i, (kind, prompt) in enumerate(prompts.items()):
        generations = result.generations[i]
        answers = [answer_of(g) for g in generations]
        common, agreement, distinct = consistency(answers)
        figures[kind] = {
            "sampling off": answer_of(off[i]),
            "answers": answers,
            "most common": common,
            "agreement": agreement,
            "distinct": distinct,
            "generation agreement": float(result.agreement[i]),
            "mutual information": float(result.mutual_information[i]),
        }
        print(f"\n{kind}: {prompt!r}")
        print(f"  sampling off: {off[i][len(prompt) :].strip()!r}")
        print(f"  {samples} sampled generations:")
        for generation, count in collections.Counter(generations).most_common():
            print(f"    {count:>2} x {generation[len(prompt) :].strip()!r}")
        print(
            f"  answer (first word): most common {common!r}, agreement "
            f"{agreement:.2f}, {distinct} distinct; per generated token: "
            f"entropy {result.predictive_entropy[i]:.3f}, mutual information "
            f"{result.mutual_information[i]:.4f} nats"
        )
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(samples=args.samples, seed=args.seed)

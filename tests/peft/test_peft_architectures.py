"""PEFT PVeRA adapters on every architecture KerasHub converts, both ways.

For each architecture: a tiny random-weight transformers model made from a
config (nothing is downloaded), saved to a temporary folder and converted by
KerasHub's `from_preset(folder)`; a PEFT PVeRA adapter trained a few steps
in PEFT (so `lambda_b` is non-zero) over every module the architecture's
spec maps. Then:

- the spec agrees with the converter: every mapped Keras kernel, read as
  PVeRA reads it, is the torch module's weight exactly, and the converted
  base model's outputs equal the transformers model's;
- PEFT -> Keras: `load_peft_adapter` gives PEFT's eval outputs;
- Keras -> PEFT: `save_peft_adapter` of other vectors gives, through
  `PeftModel.from_pretrained`, the Keras model's outputs; so does
  `save_lora_adapter`, the adapter's mean as a PEFT LoRA adapter.
"""

import dataclasses
import json

import keras
import numpy as np
import pytest

import keras_pvera
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.peft.architectures import SPECS
from keras_pvera.src.peft.module_names import kernel_matrix
from keras_pvera.src.surgery.layer_walk import iter_layers

keras_hub = pytest.importorskip("keras_hub")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft.tuners.pvera")  # PEFT itself, not this folder
import peft  # noqa: E402

# Each case trains PEFT on a converted model: the slow tier.
pytestmark = [pytest.mark.slow, pytest.mark.architecture_matrix]

TOLERANCE = 1e-4
HIDDEN, HEADS, KV_HEADS, LAYERS, INTERMEDIATE, VOCAB = 32, 4, 2, 2, 64, 100
TOKENS = np.random.default_rng(0).integers(2, VOCAB, (2, 7))
IMAGES = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype("float32")


def _text(**extra):
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        **extra,
    )


def _decoder(**extra):
    return _text(num_key_value_heads=KV_HEADS, **extra)


def _vision(**extra):
    return dict(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        image_size=28,
        patch_size=14,
        **extra,
    )


@dataclasses.dataclass(frozen=True)
class Case:
    """One architecture: how to make, feed and read its tiny models.

    `hf_class` is the transformers class saved (the one whose checkpoint
    KerasHub converts), `base` the attribute holding its base model (`""`
    when it is one), `targets` PEFT's `target_modules` regex, `inputs`
    `"text"`, `"segments"` (text with token types), `"image"` or
    `"seq2seq"`.
    """

    name: str
    config: str
    config_kwargs: dict
    hf_class: str
    base: str
    targets: str
    inputs: str = "text"
    half_precision_weights: bool = False  # the converter rounds to float16
    # Parameters KerasHub does not port (so are zero in its model).
    zeroed: tuple = ()
    extra_config: dict = dataclasses.field(default_factory=dict)

    @property
    def prefix(self):
        return f"{self.base}." if self.base else ""


_LLAMA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_BERT_TARGETS = r".*\.(query|key|value|dense)"

CASES = [
    Case(
        "bert",
        "BertConfig",
        _text(max_position_embeddings=32, hidden_act="gelu_pytorch_tanh"),
        "BertModel",
        "",
        _BERT_TARGETS,
        "segments",
    ),
    Case(
        "roberta",
        "RobertaConfig",
        _text(max_position_embeddings=34, layer_norm_eps=1e-5),
        "RobertaForMaskedLM",
        "roberta",
        r"roberta\..*\.(query|key|value|dense)",
        zeroed=("roberta.embeddings.token_type_embeddings.weight",),
    ),
    Case(
        "xlm_roberta",
        "XLMRobertaConfig",
        _text(max_position_embeddings=34, layer_norm_eps=1e-5),
        "XLMRobertaForMaskedLM",
        "roberta",
        r"roberta\..*\.(query|key|value|dense)",
        zeroed=("roberta.embeddings.token_type_embeddings.weight",),
    ),
    Case(
        "distilbert",
        "DistilBertConfig",
        dict(
            vocab_size=VOCAB,
            dim=HIDDEN,
            n_layers=LAYERS,
            n_heads=HEADS,
            hidden_dim=INTERMEDIATE,
            max_position_embeddings=32,
        ),
        "DistilBertForMaskedLM",
        "distilbert",
        r".*\.(q_lin|k_lin|v_lin|out_lin|lin1|lin2)",
    ),
    Case(
        "albert",
        "AlbertConfig",
        _text(embedding_size=16, max_position_embeddings=32),
        "AlbertForPreTraining",
        "albert",
        r"albert\..*(query|key|value|dense|ffn|ffn_output|pooler|mapping_in)",
        "segments",
    ),
    Case(
        "gpt2",
        "GPT2Config",
        dict(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS),
        "GPT2Model",
        "",
        r".*\.(c_proj|c_fc)",
    ),
    Case(
        "llama3", "LlamaConfig", _decoder(), "LlamaForCausalLM", "model", _LLAMA_TARGETS
    ),
    Case(
        "mistral",
        "MistralConfig",
        _decoder(),
        "MistralForCausalLM",
        "model",
        _LLAMA_TARGETS,
        half_precision_weights=True,
    ),
    Case(
        "mixtral",
        "MixtralConfig",
        _decoder(num_local_experts=4, num_experts_per_tok=2),
        "MixtralForCausalLM",
        "model",
        r".*\.(q_proj|k_proj|v_proj|o_proj)",
    ),
    Case(
        "qwen2", "Qwen2Config", _decoder(), "Qwen2ForCausalLM", "model", _LLAMA_TARGETS
    ),
    Case(
        "qwen3",
        "Qwen3Config",
        # KerasHub's query/key norms use 1e-5 whatever the config says.
        _decoder(head_dim=8, rms_norm_eps=1e-5),
        "Qwen3ForCausalLM",
        "model",
        _LLAMA_TARGETS,
    ),
    Case(
        "gemma",
        "GemmaConfig",
        _decoder(head_dim=8),
        "GemmaForCausalLM",
        "model",
        _LLAMA_TARGETS,
    ),
    Case(
        "gemma2",
        "Gemma2Config",
        _decoder(head_dim=8, query_pre_attn_scalar=8),
        "Gemma2ForCausalLM",
        "model",
        _LLAMA_TARGETS,
    ),
    Case(
        "gemma3",
        "Gemma3TextConfig",
        _decoder(head_dim=8, query_pre_attn_scalar=8),
        "Gemma3ForCausalLM",
        "model",
        _LLAMA_TARGETS,
    ),
    Case(
        "vit",
        "ViTConfig",
        _vision(intermediate_size=INTERMEDIATE, layer_norm_eps=1e-6),
        "ViTForImageClassification",
        "vit",
        r"vit\..*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)",
        "image",
    ),
    Case(
        "deit",
        "DeiTConfig",
        _vision(intermediate_size=INTERMEDIATE),
        "DeiTForImageClassification",
        "deit",
        r"deit\..*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)",
        "image",
    ),
    Case(
        "dinov2",
        "Dinov2Config",
        _vision(mlp_ratio=2),
        "Dinov2Model",
        "",
        r".*\.(q_proj|k_proj|v_proj|o_proj|fc1|fc2)",
        "image",
    ),
    Case(
        "dinov3",
        "DINOv3ViTConfig",
        _vision(intermediate_size=INTERMEDIATE, use_gated_mlp=True),
        "DINOv3ViTModel",
        "",
        r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        "image",
    ),
    Case(
        "bart",
        "BartConfig",
        dict(
            vocab_size=VOCAB,
            d_model=HIDDEN,
            encoder_layers=LAYERS,
            decoder_layers=LAYERS,
            encoder_attention_heads=HEADS,
            decoder_attention_heads=HEADS,
            encoder_ffn_dim=INTERMEDIATE,
            decoder_ffn_dim=INTERMEDIATE,
            max_position_embeddings=32,
        ),
        "BartModel",
        "",
        r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)",
        "seq2seq",
        # KerasHub reads `num_hidden_layers`, which transformers 5 no longer
        # writes for BART (Hub checkpoints have it).
        extra_config={"num_hidden_layers": LAYERS},
    ),
]


def hf_inputs(case):
    tokens = torch.tensor(TOKENS)
    ones = torch.ones(TOKENS.shape, dtype=torch.long)
    if case.inputs == "image":
        return {"pixel_values": torch.tensor(IMAGES.transpose(0, 3, 1, 2))}
    if case.inputs == "seq2seq":
        return {
            "input_ids": tokens,
            "attention_mask": ones,
            "decoder_input_ids": tokens.flip(-1),
            "decoder_attention_mask": ones,
        }
    inputs = {"input_ids": tokens, "attention_mask": ones}
    if case.inputs == "segments":
        inputs["token_type_ids"] = torch.zeros_like(tokens)
    return inputs


def keras_inputs(case):
    mask = np.ones(TOKENS.shape, bool)
    if case.inputs == "image":
        return IMAGES  # The backbones name their image input differently.
    if case.inputs == "seq2seq":
        return {
            "encoder_token_ids": TOKENS,
            "encoder_padding_mask": mask,
            "decoder_token_ids": TOKENS[:, ::-1].copy(),
            "decoder_padding_mask": mask,
        }
    inputs = {"token_ids": TOKENS, "padding_mask": mask}
    if case.inputs == "segments":
        inputs["segment_ids"] = np.zeros_like(TOKENS)
    return inputs


# KerasHub backbone output names -> transformers output fields.
_FIELDS = {
    "sequence_output": "last_hidden_state",
    "pooled_output": "pooler_output",
    "encoder_sequence_output": "encoder_last_hidden_state",
    "decoder_sequence_output": "last_hidden_state",
}


def keras_outputs(case, model):
    out = model.predict(keras_inputs(case), verbose=0)
    if not isinstance(out, dict):
        out = {"sequence_output": out}
    return {k: np.asarray(v, "float32") for k, v in out.items()}


def hf_outputs(case, model, keys):
    """The transformers base model's outputs named as KerasHub's `keys`."""
    base = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    if case.base:
        base = getattr(base, case.base)
    model.eval()
    with torch.no_grad():
        out = base(**hf_inputs(case))
    return {k: getattr(out, _FIELDS[k]).numpy() for k in keys}


def max_difference(first, second):
    assert sorted(first) == sorted(second)
    return max(float(np.abs(first[k] - second[k]).max()) for k in first)


def make_hf_model(case, folder):
    torch.manual_seed(0)
    config = getattr(transformers, case.config)(**case.config_kwargs)
    model = getattr(transformers, case.hf_class)(config)
    if case.half_precision_weights:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
    with torch.no_grad():
        for name in case.zeroed:
            model.get_parameter(name).zero_()
    model.save_pretrained(folder)
    if case.extra_config:
        path = folder / "config.json"
        saved = json.loads(path.read_text())
        path.write_text(json.dumps({**saved, **case.extra_config}))


def load_hf(case, folder):
    return getattr(transformers, case.hf_class).from_pretrained(folder)


def train_peft_adapter(case, folder, adapter_folder):
    """A PEFT PVeRA adapter trained 5 Adam steps from PEFT's init."""
    torch.manual_seed(1)
    model = peft.get_peft_model(
        load_hf(case, folder),
        peft.PveraConfig(r=8, target_modules=case.targets, projection_prng_key=3),
    )
    base = model.get_base_model()
    base = getattr(base, case.base) if case.base else base
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.3)
    model.train()
    for _ in range(5):
        out = base(**hf_inputs(case))
        hidden = out.last_hidden_state
        loss = (hidden - 1.0).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_folder)
    return model


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.name)
def case(request, tmp_path_factory):
    """An architecture's folder, its PEFT adapter and PEFT's outputs."""
    case = request.param
    folder = tmp_path_factory.mktemp(f"hf_{case.name}")
    make_hf_model(case, folder)
    adapter = folder / "peft_adapter"
    model = train_peft_adapter(case, folder, adapter)
    keys = list(keras_outputs(case, keras_backbone(folder)))
    expected = hf_outputs(case, model, keys)
    with model.disable_adapter():
        without = hf_outputs(case, model, keys)
    return case, folder, adapter, expected, without


def keras_backbone(folder):
    return keras_hub.models.Backbone.from_preset(str(folder))


def test_spec_matches_converter(case, record_property):
    """Each mapped kernel is the torch weight; base outputs agree."""
    case, folder, _, _, without = case
    hf = load_hf(case, folder)
    backbone = keras_backbone(folder)
    spec = next(
        spec
        for cls in type(backbone).__mro__
        if (spec := SPECS.get(cls.__name__)) is not None
    )
    layers = dict(iter_layers(backbone))
    mapped = 0
    for module_name, module in hf.named_modules():
        if type(module).__name__ not in ("Linear", "Conv1D"):
            continue
        keras_path, refusal = spec.find(module_name)
        weight = module.weight.detach().numpy()
        layout = "conv1d" if type(module).__name__ == "Conv1D" else "transposed"
        torch_matrix = weight if layout == "conv1d" else weight.T
        parts = spec.find_fused(module_name)
        if parts is not None:
            # A fused module (GPT-2's c_attn): its parts' kernels side by side.
            matrices = [
                kernel_matrix(
                    keras.ops.convert_to_numpy(layers[part].kernel),
                    layout,
                    getattr(layers[part], "equation", None),
                )
                for part in parts
            ]
            np.testing.assert_array_equal(
                np.concatenate(matrices, axis=1), torch_matrix, err_msg=module_name
            )
            assert spec.hf_fused_module(parts, case.prefix) == module_name
            mapped += 1
            continue
        if keras_path is None:
            assert refusal is not None or not module_name.startswith(case.prefix), (
                module_name
            )
            continue
        layer = layers[keras_path]
        kernel = keras.ops.convert_to_numpy(layer.kernel)
        equation = getattr(layer, "equation", None)
        np.testing.assert_array_equal(
            kernel_matrix(kernel, layout, equation), torch_matrix, err_msg=module_name
        )
        assert spec.hf_module(keras_path, "transformers5", case.prefix) == module_name
        mapped += 1
    assert mapped >= 2 * LAYERS
    difference = max_difference(keras_outputs(case, backbone), without)
    record_property("base_max_difference", difference)
    assert difference <= TOLERANCE


def test_peft_adapter_loads_in_keras(case, record_property):
    case, folder, adapter, expected, without = case
    moved = max_difference(expected, without)
    record_property("peft_adapter_moves_outputs_by", moved)
    assert moved > 1e-2
    model = keras_pvera.load_peft_adapter(keras_backbone(folder), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == model.pvera_config.rank == 8
    assert len(model.adapted_layers) >= 2 * LAYERS
    difference = max_difference(keras_outputs(case, model), expected)
    record_property("peft_to_keras_max_difference", difference)
    assert difference <= TOLERANCE


def test_keras_adapter_loads_in_peft_as_pvera_and_as_lora(
    case, record_property, tmp_path
):
    """Keras -> PEFT, as a PVeRA adapter and as its mean written as a LoRA
    (`save_lora_adapter`): both give the Keras model's mean outputs."""
    case, folder, adapter, _, without = case
    model = keras_pvera.load_peft_adapter(keras_backbone(folder), adapter)
    rng = np.random.default_rng(7)
    for layer in model.adapted_layers.values():
        assert isinstance(layer, PVeRADense)
        for vector in (layer.lambda_d, layer.lambda_b):
            vector.assign(rng.normal(0, 0.2, vector.shape).astype("float32"))
    expected = keras_outputs(case, model)
    assert max_difference(expected, without) > 1e-2

    keras_pvera.save_peft_adapter(model, tmp_path / "pvera", module_prefix=case.prefix)
    loaded = peft.PeftModel.from_pretrained(
        load_hf(case, folder), str(tmp_path / "pvera")
    )
    as_pvera = hf_outputs(case, loaded, list(expected))
    difference = max_difference(as_pvera, expected)
    record_property("keras_to_peft_max_difference", difference)
    assert difference <= TOLERANCE

    keras_pvera.save_lora_adapter(model, tmp_path / "lora", module_prefix=case.prefix)
    loaded = peft.PeftModel.from_pretrained(
        load_hf(case, folder), str(tmp_path / "lora")
    )
    assert isinstance(loaded.peft_config["default"], peft.LoraConfig)
    as_lora = hf_outputs(case, loaded, list(expected))
    difference = max_difference(as_lora, expected)
    record_property("keras_to_peft_lora_max_difference", difference)
    assert difference <= TOLERANCE
    difference = max_difference(as_lora, as_pvera)
    record_property("peft_lora_to_peft_pvera_max_difference", difference)
    assert difference <= TOLERANCE


# PEFT's modules_to_save: a task head trained in full.

HEAD_TASKS = {
    "bert": ("BertForSequenceClassification", "BertTextClassifier"),
    "roberta": ("RobertaForSequenceClassification", "RobertaTextClassifier"),
    "xlm_roberta": (
        "XLMRobertaForSequenceClassification",
        "XLMRobertaTextClassifier",
    ),
    "distilbert": (
        "DistilBertForSequenceClassification",
        "DistilBertTextClassifier",
    ),
    "albert": ("AlbertForSequenceClassification", "AlbertTextClassifier"),
    "vit": ("ViTForImageClassification", "ViTImageClassifier"),
}
CLASSES = 3
HEAD_LR = 0.3


@pytest.mark.parametrize("name", sorted(HEAD_TASKS))
def test_task_head_in_modules_to_save_both_ways(name, tmp_path, record_property):
    hf_class, task_class = HEAD_TASKS[name]
    base_case = next(case for case in CASES if case.name == name)
    case = dataclasses.replace(
        base_case,
        hf_class=hf_class,
        config_kwargs={**base_case.config_kwargs, "num_labels": CLASSES},
    )
    head = next(
        spec.head(task_class) for spec in SPECS.values() if spec.head(task_class)
    )
    folder = tmp_path / "hf"
    make_hf_model(case, folder)

    torch.manual_seed(1)
    model = peft.get_peft_model(
        load_hf(case, folder),
        peft.PveraConfig(
            r=8,
            target_modules=case.targets,
            modules_to_save=list(head.modules_to_save),
        ),
    )
    optimizer = torch.optim.Adam(
        [p for p in model.parameters() if p.requires_grad], lr=HEAD_LR
    )
    labels = torch.tensor([0, 2])
    model.train()
    for _ in range(5):
        logits = model(**hf_inputs(case)).logits
        torch.nn.functional.cross_entropy(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()

    def peft_logits(peft_model):
        with torch.no_grad():
            return peft_model(**hf_inputs(case)).logits.numpy()

    expected = peft_logits(model)
    with model.disable_adapter():
        assert np.abs(expected - peft_logits(model)).max() > 1e-2
    model.save_pretrained(tmp_path / "adapter")

    task = getattr(keras_hub.models, task_class).from_preset(
        str(folder), num_classes=CLASSES, preprocessor=None
    )
    adapted = keras_pvera.load_peft_adapter(task, tmp_path / "adapter")
    assert sorted(adapted.trainable_paths) == sorted(path for _, path in head.layers)
    actual = np.asarray(adapted.predict(keras_inputs(case), verbose=0))
    difference = float(np.abs(actual - expected).max())
    record_property("peft_to_keras_max_difference", difference)
    assert difference <= TOLERANCE

    # And back, with other head weights: written as modules_to_save.
    layers = dict(iter_layers(adapted.base_model))
    rng = np.random.default_rng(5)
    for _, path in head.layers:
        for weight in layers[path].weights:
            weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    actual = np.asarray(adapted.predict(keras_inputs(case), verbose=0))
    keras_pvera.save_peft_adapter(adapted, tmp_path / "back")
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(head.modules_to_save)
    back = peft.PeftModel.from_pretrained(load_hf(case, folder), str(tmp_path / "back"))
    back.eval()
    difference = float(np.abs(peft_logits(back) - actual).max())
    record_property("keras_to_peft_max_difference", difference)
    assert difference <= TOLERANCE

    # The same as a LoRA: the head is modules_to_save there too.
    keras_pvera.save_lora_adapter(adapted, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == list(head.modules_to_save)
    lora = peft.PeftModel.from_pretrained(load_hf(case, folder), str(tmp_path / "lora"))
    lora.eval()
    difference = float(np.abs(peft_logits(lora) - actual).max())
    record_property("keras_to_peft_lora_max_difference", difference)
    assert difference <= TOLERANCE

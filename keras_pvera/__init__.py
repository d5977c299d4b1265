"""keras_pvera: PVeRA (Probabilistic Vector-Based Random Matrix Adaptation)
for Keras 3, on every backend.

Example:

>>> import keras, keras_pvera
>>> base = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16),
...                          keras.layers.Dense(3)])
>>> model = keras_pvera.apply(base, rank=4)
>>> model.compile(optimizer="adam", loss="mse")
"""

from keras_pvera.src.layers.divergence import kl_divergence
from keras_pvera.src.layers.projections import ProjectionRegistry
from keras_pvera.src.layers.projections import generate_projections
from keras_pvera.src.layers.pvera_config import PVeRAConfig
from keras_pvera.src.layers.pvera_dense import PVeRADense
from keras_pvera.src.layers.pvera_embedding import PVeRAEmbedding
from keras_pvera.src.models.model_export import export_with_uncertainty
from keras_pvera.src.models.pvera_model import PVeRAModel
from keras_pvera.src.models.pvera_model import apply
from keras_pvera.src.peft.lora_adapter import save_lora_adapter
from keras_pvera.src.peft.peft_interop import load_peft_adapter
from keras_pvera.src.peft.peft_interop import save_peft_adapter
from keras_pvera.src.saving.adapter_files import hotswap_adapter
from keras_pvera.src.saving.adapter_files import load_adapter
from keras_pvera.src.saving.adapter_files import save_adapter
from keras_pvera.src.saving.keras_hub_lora import save_lora_weights
from keras_pvera.src.saving.merging import merge
from keras_pvera.src.uncertainty.diagnosis import UncertaintyDiagnosis
from keras_pvera.src.uncertainty.diagnosis import diagnose_uncertainty
from keras_pvera.src.uncertainty.evaluation import UncertaintyReport
from keras_pvera.src.uncertainty.evaluation import evaluate_uncertainty
from keras_pvera.src.uncertainty.generation import GenerationUncertainty
from keras_pvera.src.uncertainty.generation import generate_with_uncertainty
from keras_pvera.src.uncertainty.metrics import ExpectedCalibrationError
from keras_pvera.src.uncertainty.metrics import calibration_bins
from keras_pvera.src.uncertainty.metrics import expected_calibration_error
from keras_pvera.src.uncertainty.metrics import reliability_diagram
from keras_pvera.src.uncertainty.monte_carlo import predict_with_uncertainty
from keras_pvera.src.uncertainty.statistics import UncertaintyResult
from keras_pvera.src.uncertainty.temperature_scaling import calibrate

__version__ = "0.1.0"

__all__ = [
    "ExpectedCalibrationError",
    "GenerationUncertainty",
    "PVeRADense",
    "PVeRAEmbedding",
    "PVeRAConfig",
    "PVeRAModel",
    "ProjectionRegistry",
    "UncertaintyDiagnosis",
    "UncertaintyReport",
    "UncertaintyResult",
    "apply",
    "calibrate",
    "calibration_bins",
    "diagnose_uncertainty",
    "evaluate_uncertainty",
    "expected_calibration_error",
    "export_with_uncertainty",
    "generate_projections",
    "generate_with_uncertainty",
    "hotswap_adapter",
    "kl_divergence",
    "load_adapter",
    "load_peft_adapter",
    "merge",
    "save_adapter",
    "save_lora_adapter",
    "save_lora_weights",
    "save_peft_adapter",
    "predict_with_uncertainty",
    "reliability_diagram",
]

"""Sample quality of vqgpt: Fréchet distance, precision/recall and class accuracy, with their real-data floors.

Feature spaces: the reference classifier that vqgpt trains on the dataset (``train.classifier``; offline,
any domain) or Inception-v3 (the standard FID, through torch-fidelity; needs its weights once).
"""

from .classifier import Classifier, ClassifierConfig
from .evaluator import Evaluator, Report, load_sample_folder
from .features import ClassifierSpace, InceptionSpace
from .metrics import Gaussian, class_accuracy, frechet_distance, precision_recall

__all__ = ["Classifier", "ClassifierConfig", "Evaluator", "Report", "load_sample_folder", "ClassifierSpace",
           "InceptionSpace", "Gaussian", "class_accuracy", "frechet_distance", "precision_recall"]  # fmt: skip

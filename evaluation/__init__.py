"""Sample quality of vqgpt: Fréchet distance, KID, precision/recall in several feature spaces, class accuracy
and a detail statistic, each with its real-data floor.

Feature spaces: the networks vqgpt trains on the dataset (``train.classifier``: the reference classifier,
a ResNet, a contrastive encoder trained without labels; offline, any domain) and Inception-v3 (the
standard FID, through torch-fidelity; needs its weights once).
"""

from .classifier import Classifier, ClassifierConfig
from .evaluator import Embedded, Evaluator, Report, SpaceReport, load_sample_folder
from .features import ClassifierSpace, InceptionSpace, load_spaces
from .metrics import Gaussian, class_accuracy, frechet_distance, kernel_distance, laplacian_variance, precision_recall

__all__ = ["Classifier", "ClassifierConfig", "Embedded", "Evaluator", "Report", "SpaceReport", "load_sample_folder",
           "ClassifierSpace", "InceptionSpace", "load_spaces", "Gaussian", "class_accuracy", "frechet_distance",
           "kernel_distance", "laplacian_variance", "precision_recall"]  # fmt: skip

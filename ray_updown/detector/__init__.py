"""Bottom-up attention: Faster R-CNN ResNet-C4 with an attribute head (Anderson et al. 3.1).

Public API:
    DetectorConfig, paper_config, world_config, tiny_config      (config)
    BottomUpDetector: .extract_regions(images), .detect(images), forward(images, targets)
    DetectionTarget                                               (training targets)
    select_regions, per_class_nms_best_scores                     (generate_tsv's rule)
    GridFeatureExtractor, grid_boxes                              (ResNet grid baseline, 4.2)
    save_detector, load_detector, state_dict_report               (our checkpoints)
    load_published, model_from_published, convert_state, export_state   (published weights)
"""

from ray_updown.detector.checkpoint import load_detector, save_detector
from ray_updown.detector.config import DetectorConfig, paper_config, tiny_config, world_config
from ray_updown.detector.converters import LAYOUTS, convert_state, export_state, load_published, model_from_published
from ray_updown.detector.grid import GridFeatureExtractor, grid_boxes
from ray_updown.detector.model import BottomUpDetector, ImagePredictions
from ray_updown.detector.roi_heads import DetectionTarget
from ray_updown.detector.select import per_class_nms_best_scores, select_regions
from ray_updown.weights import state_dict_report

__all__ = [
    "BottomUpDetector", "DetectionTarget", "DetectorConfig", "GridFeatureExtractor",
    "ImagePredictions", "LAYOUTS", "convert_state", "export_state", "grid_boxes",
    "load_detector", "load_published", "model_from_published", "paper_config",
    "per_class_nms_best_scores", "save_detector", "select_regions", "state_dict_report",
    "tiny_config", "world_config",
]

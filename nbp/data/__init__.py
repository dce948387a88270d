"""Datasets: procedural synthetic clips, video folders (UCF-101 / Kinetics layouts), cached tokens."""
from .synthetic import CLASS_NAMES, SyntheticVideos, render_clip
from .tokens import TokenDataset, crop_windows, extract_tokens, window_starts
from .video_folder import VideoFolder

__all__ = ["SyntheticVideos", "render_clip", "CLASS_NAMES", "VideoFolder", "TokenDataset",
           "extract_tokens", "window_starts", "crop_windows"]

"""Torch modules of the forecasters. They take tensors, never datasets, stores or paths.

* :mod:`~forecasting.models.layers`: MLP, conditional layer norm, GraphCast-style interaction network;
* :mod:`~forecasting.models.graph_network`: :class:`GraphTensors` (torch views of a
  :class:`~forecasting.graphs.ForecastGraph`) and the :class:`EncodeProcessDecode` graph network;
* :mod:`~forecasting.models.unet`: the latitude-longitude :class:`UNet` of the diffusion families;
* :mod:`~forecasting.models.spectral_filter`: :class:`SpectralFilter`, spherical-harmonic hyperdiffusion.
"""

from forecasting.models.graph_network import EncodeProcessDecode, GraphTensors, graph_tensors
from forecasting.models.layers import MLP, ConditionalLayerNorm, InteractionNetwork
from forecasting.models.spectral_filter import SpectralFilter
from forecasting.models.unet import UNet

__all__ = [
    "MLP", "ConditionalLayerNorm", "EncodeProcessDecode", "GraphTensors", "InteractionNetwork", "SpectralFilter",
    "UNet", "graph_tensors",
]

"""saev: the reference implementation of SAE-V (ICML 2025).

Sparse autoencoders on the residual stream of multimodal LLMs, the paper's Algorithms 1-7
(cross-modal feature weights, data ranking, image-patch filtering) and the tools to
regenerate its tables and figures. Submodules are imported on demand so that, e.g.,
``saev.train`` never pulls in ``transformers``.
"""

__version__ = "0.1.0"

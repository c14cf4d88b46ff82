"""The paper's experiments: everything that turns the core into the paper's tables and figures.

| module | what |
|---|---|
| ``profile`` | ``params/<name>.yaml`` as validated sections (``load_profile``) |
| ``common`` | what every stage shares: its sections, models, threads, tables |
| ``data`` | the real data sets' loaders, one per role, and a profile's data by role |
| ``world`` | the one place that builds the ``ci``/``mini`` world (imports ``saev.shapesworld``) |
| ``sae_training`` | Section 3.1: SAE and SAE-V training, reconstruction (notebooks 01-02) |
| ``patch_filtering`` | Section 3.2, App. C: omega_k, image patch filtering, the gallery (notebook 03) |
| ``alignment`` | Section 4: preference scores, defect detection, the sweeps of Figs. 7-11 (notebooks 04-06) |
| ``finetune`` | DPO / SFT on the kept pairs (TRL) |
| ``benchmark`` | LLaVA-Bench-style benchmark and the fine-tune-and-benchmark sweep |
| ``judge`` | the judge model of a real benchmark |
| ``plots`` | every figure |
| ``__main__`` | ``python -m saev.paper <stage> --profile NAME`` |
"""

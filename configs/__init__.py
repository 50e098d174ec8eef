"""Experiment configs: `common.py` holds the paper's recipe, one thin file per variant.

Load a file with ml_collections (`--config=configs/msca_kv.py`) or import it
(`from configs import msca_kv; cfg = msca_kv.get_config()`).
"""

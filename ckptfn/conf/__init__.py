"""Hydra configuration shipped with ckptfn (use with ``initialize_config_module("ckptfn.conf")``)."""

"""Integrations with the ecosystem: torchao quantisation of the dictionary (``spadi_ao.integrations.torchao``)
and transformers ``save_pretrained`` / ``from_pretrained`` (``spadi_ao.integrations.transformers``)."""

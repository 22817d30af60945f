"""Data: the MMRec layout reader (``dataset``), the training graph (``graph``), generated data (``synth``) and
raw-Amazon preparation (``amazon``, ``prepare``). Import the submodules; this package imports nothing, so that
``msi-data`` starts without loading torch."""

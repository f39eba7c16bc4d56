"""Analyses of trained adapters: expert allocation, task embeddings, parameter tables and sweep summaries.

* :mod:`.allocation`: per task, how often each expert is selected (and its mean gate weight) in every routed layer.
* :mod:`.embeddings`: PCA and cosine similarity of the learned task embeddings.
* :mod:`.params`: the Appendix C parameter table of a config or a named model, built on the meta device.
* :mod:`.sweeps`: sweep configs (named variants of one experiment) and the paper-layout summary of their results.
* :mod:`.cli`: the ``ept analyze`` commands.

Submodules are imported on use, so that ``import pyramid_peft.analysis`` stays cheap for the command line.
"""

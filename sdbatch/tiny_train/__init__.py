"""Training of the embedded tiny family on procedural toy scenes (python -m sdbatch.tiny_train).

Not imported by a render: the trained weights ship as files and load like any other model.
"""

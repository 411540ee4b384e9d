"""ONNX in, ONNX out (issue 20): fold BatchNormalization nodes of an `.onnx` graph, prove it, write it.

`load` reads a file within bounds (nothing from it reaches onnx or onnxruntime before it is
checked and re-serialised), `graph` indexes a graph, `rules` is the pattern table, `edit`
applies one fold in float64 (core.foldmath), `check` is the proof, `fold` drives them
(`fold_onnx`), `save` writes the result through io.write, `export` turns a folded torch
model into a proven `.onnx` file. onnx and onnxruntime come with the `[onnx]` extra.
"""

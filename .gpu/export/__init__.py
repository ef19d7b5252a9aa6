"""ONNX export of rwkv-edge models: step/prefill graphs with explicit state, dense and sparse FFN.

    from rwkv_edge.export.export import export_onnx        # model -> directory with model.onnx + model.json
    from rwkv_edge.export.verify import verify, to_ort     # onnxruntime vs the Python runtime; .ort files
    python export/run_ort.py --onnx DIR --prompt "..."   # generation with onnxruntime only
"""

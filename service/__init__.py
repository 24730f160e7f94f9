"""HTTP service for NoProp classifiers exported to ONNX.

``python -m service`` (or ``noprop-serve``) serves the model named by
NOPROP_MODEL_PATH; ``service.app.create_app`` builds the FastAPI app. The
service depends on onnxruntime, not on torch.
"""

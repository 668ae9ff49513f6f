"""How a served version's inputs arrive: the decoders `serve-model` runs on every request (JSON examples and
records, PNG/JPEG files and text, KServe v2 tensors). They live with the job so the contract check sends a
model's own examples through exactly the path serving will (automation/serving_check.py)."""

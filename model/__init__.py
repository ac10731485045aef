"""The device-agnostic DeepSeek-V4 graph on the HAL (the model-graph issue builds it out)."""

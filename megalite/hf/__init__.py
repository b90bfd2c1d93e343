"""The model's Hugging Face adapter: Llama config and tensor-name mapping (`convert`), safetensors
folders and tokenizer files (`files`). Works on whole-model tensors; checkpoints do the sharding."""

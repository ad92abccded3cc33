"""One rank's execution of step plans: the plan format, the model runner, decode inputs and CUDA graphs,
sampling and logits processors, prompt logprobs, and the context-parallel token split."""

# Fine-tune a pretrained GPT-2 (124M parameters) on your own text, on a laptop CPU or a GPU.
# Fetch the model once (this step needs the internet; see README, "Start from GPT-2"), then:
#   python train.py configs/finetune_gpt2.py --data=path/to/my.txt
#   python train.py configs/finetune_gpt2.py --init_from=models/gpt2-chinese --data=data/poems
# Sizes chosen for a CPU: 2 x 4 sequences of 256 tokens a step (2,048 tokens). On a GPU raise
# batch_size (e.g. 16) and block_size (up to 1024).
out_dir = "out/finetune-gpt2"
task = "text"
init_from = "models/gpt2"  # a Hugging Face GPT-2 folder (or any checkpoint of ours)
data = "data/poems"
val_fraction = 0.1
block_size = 256  # GPT-2 reads up to 1024 tokens; 256 costs a quarter and suits most fine-tunes

batch_size = 2
gradient_accumulation_steps = 4
learning_rate = 3e-5  # small: the model already knows language; adjust it, don't overwrite it
min_lr = 3e-6
warmup_iters = 10
max_iters = 100
lr_decay_iters = 100
weight_decay = 0.1
beta2 = 0.95
dropout = 0.0

eval_interval = 25
eval_iters = 5
log_interval = 1
always_save_checkpoint = False  # keep the checkpoint with the best validation loss

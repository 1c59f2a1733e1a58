# Fine-tune a trained model on your own text (a UTF-8 file or a folder of .txt files):
#   python train.py configs/finetune.py --data=path/to/my.txt --init_from=out/chinese
# New characters join the vocabulary; known ones keep their ids and learned embeddings.
out_dir = "out/finetune"
task = "text"
init_from = "out/chinese"  # an out_dir or a checkpoint file
data = "data/poems"
val_fraction = 0.15  # the end of the text, for the val loss
block_size = 0  # 0 keeps the base model's; a smaller number crops its position embeddings

batch_size = 16
learning_rate = 1e-3  # lower than training from scratch: adjust, don't overwrite
max_iters = 500
lr_decay_iters = 500
warmup_iters = 20
min_lr = 1e-4
dropout = 0.0

eval_interval = 100
eval_iters = 10

"""What every vqgpt tool shares: command lines and one-line errors (cli), folders that appear whole
(files), datasets -> image tensors (data), image conversions and grids (images), model cards and Hub
uploads (hub). It imports no other vqgpt package, so every floor may import it."""

"""Stage 1 of a run, in the order a sample travels: value types (`types`) -> records and tables on disk (`records`,
`tables`) -> images (`images`) and their token counts (`image_tokens`) -> chat template and encoder
(`chat_template`, `encoder`: messages -> tokens + labels) -> the checking pass (`checking`) and its token cache
(`token_cache`) -> mixtures (`mixture`) -> the dataset (`dataset`) -> packing and token-budget plans (`packing`) ->
batches (`collator`).

Nothing here imports the model or training stages: the processor arrives as an object, the number of tokens per
image as an `ImageTokens` (`image_tokens`: the model stage decides the arithmetic)."""

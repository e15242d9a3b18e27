"""HyperHuman pipeline: annotation jobs, shards, the LSDM and SGR, and their evaluation."""

import logging

# With torchao installed (the int8 PT2E path), diffusers imports it whenever it loads its quantizers:
# torchao 0.18 registers Enum pytree constants, which torch 2.14 warns about one by one, and
# diffusers warns that torchao's NF4 tensors do not import. Neither concerns anything we run, and
# they would open every command's stderr, so these two messages (only these) are dropped.
_IMPORT_NOISE = {
    "torch.utils._pytree": "is an Enum subclass and is now natively supported",
    "diffusers.quantizers.torchao.torchao_quantizer": "Unable to import `torchao` Tensor objects",
}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


for _logger, _text in _IMPORT_NOISE.items():
    logging.getLogger(_logger).addFilter(_DropMessage(_text))

"""The one place where runv-py's error codes become ttrpc (google.rpc) status codes,
which containerd's errdefs turns back into its own errors."""
from .. import ttrpc
from ..hyperstart import errors

TTRPC_CODES = {
    errors.NOT_FOUND: ttrpc.NOT_FOUND,
    errors.ALREADY_EXISTS: ttrpc.ALREADY_EXISTS,
    errors.FAILED_PRECONDITION: ttrpc.FAILED_PRECONDITION,
    errors.INVALID_ARGUMENT: ttrpc.INVALID_ARGUMENT,
    errors.UNAVAILABLE: ttrpc.UNAVAILABLE,
    errors.INTERNAL: ttrpc.INTERNAL,
}


def ttrpc_error(error: BaseException) -> ttrpc.TtrpcError:
    code = TTRPC_CODES.get(errors.code_of(error), ttrpc.UNKNOWN)
    return ttrpc.TtrpcError(code, str(error) or type(error).__name__)

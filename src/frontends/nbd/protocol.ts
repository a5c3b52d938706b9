/**
 * Every constant of the NBD protocol, spelled as the specification spells
 * it (NetworkBlockDevice/nbd, doc/proto.md). Magic numbers, flags, option
 * and reply types, command types and error values live here and nowhere
 * else; the parsers and encoders import them.
 */

// "Handshake": S: 64 bits, 0x4e42444d41474943 (ASCII 'NBDMAGIC'), then
// S: 64 bits, 0x49484156454F5054 (ASCII 'IHAVEOPT').
export const NBDMAGIC = 0x4e42444d41474943n
export const IHAVEOPT = 0x49484156454f5054n
/** "S: 64 bits, 0x3e889045565a9 (magic number for replies)" (option replies). */
export const NBD_REP_MAGIC = 0x3e889045565a9n
/** "Request message": C: 32 bits, 0x25609513. */
export const NBD_REQUEST_MAGIC = 0x25609513
/** "Simple reply message": S: 32 bits, 0x67446698. */
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698
/** "Structured reply chunk message": S: 32 bits, 0x668e33ef. */
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef
/** Reserved for the experimental EXTENDED_HEADERS extension; never negotiated here. */
export const NBD_EXTENDED_REQUEST_MAGIC = 0x21e41c71

// Handshake flags (16 bits, server).
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
export const NBD_FLAG_NO_ZEROES = 1 << 1

// Client flags (32 bits).
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
export const NBD_FLAG_C_NO_ZEROES = 1 << 1

// Transmission flags (16 bits).
export const NBD_FLAG_HAS_FLAGS = 1 << 0
export const NBD_FLAG_READ_ONLY = 1 << 1
export const NBD_FLAG_SEND_FLUSH = 1 << 2
export const NBD_FLAG_SEND_FUA = 1 << 3
export const NBD_FLAG_ROTATIONAL = 1 << 4
export const NBD_FLAG_SEND_TRIM = 1 << 5
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
export const NBD_FLAG_SEND_DF = 1 << 7
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8
export const NBD_FLAG_SEND_RESIZE = 1 << 9
export const NBD_FLAG_SEND_CACHE = 1 << 10
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11
export const NBD_FLAG_BLOCK_STATUS_PAYLOAD = 1 << 12

// Option types.
export const NBD_OPT_EXPORT_NAME = 1
export const NBD_OPT_ABORT = 2
export const NBD_OPT_LIST = 3
export const NBD_OPT_PEEK_EXPORT = 4
export const NBD_OPT_STARTTLS = 5
export const NBD_OPT_INFO = 6
export const NBD_OPT_GO = 7
export const NBD_OPT_STRUCTURED_REPLY = 8
export const NBD_OPT_LIST_META_CONTEXT = 9
export const NBD_OPT_SET_META_CONTEXT = 10
export const NBD_OPT_EXTENDED_HEADERS = 11

// Option reply types. "All of which [errors] are denoted by having bit 31 set."
export const NBD_REP_ACK = 1
export const NBD_REP_SERVER = 2
export const NBD_REP_INFO = 3
export const NBD_REP_META_CONTEXT = 4
export const NBD_REP_FLAG_ERROR = 2 ** 31
export const NBD_REP_ERR_UNSUP = 2 ** 31 + 1
export const NBD_REP_ERR_POLICY = 2 ** 31 + 2
export const NBD_REP_ERR_INVALID = 2 ** 31 + 3
export const NBD_REP_ERR_PLATFORM = 2 ** 31 + 4
export const NBD_REP_ERR_TLS_REQD = 2 ** 31 + 5
export const NBD_REP_ERR_UNKNOWN = 2 ** 31 + 6
export const NBD_REP_ERR_SHUTDOWN = 2 ** 31 + 7
export const NBD_REP_ERR_BLOCK_SIZE_REQD = 2 ** 31 + 8
export const NBD_REP_ERR_TOO_BIG = 2 ** 31 + 9
export const NBD_REP_ERR_EXT_HEADER_REQD = 2 ** 31 + 10

// Information types of NBD_REP_INFO.
export const NBD_INFO_EXPORT = 0
export const NBD_INFO_NAME = 1
export const NBD_INFO_DESCRIPTION = 2
export const NBD_INFO_BLOCK_SIZE = 3

// Request types.
export const NBD_CMD_READ = 0
export const NBD_CMD_WRITE = 1
export const NBD_CMD_DISC = 2
export const NBD_CMD_FLUSH = 3
export const NBD_CMD_TRIM = 4
export const NBD_CMD_CACHE = 5
export const NBD_CMD_WRITE_ZEROES = 6
export const NBD_CMD_BLOCK_STATUS = 7
export const NBD_CMD_RESIZE = 8

// Command flags (16 bits).
export const NBD_CMD_FLAG_FUA = 1 << 0
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1
export const NBD_CMD_FLAG_DF = 1 << 2
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4
export const NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

// Structured reply flags and types. "All error chunk types have bit 15 set."
export const NBD_REPLY_FLAG_DONE = 1 << 0
export const NBD_REPLY_TYPE_NONE = 0
export const NBD_REPLY_TYPE_OFFSET_DATA = 1
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5
export const NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
export const NBD_REPLY_TYPE_ERROR = (1 << 15) + 1
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

// base:allocation flags ("The base: metadata namespace").
export const NBD_STATE_HOLE = 1 << 0
export const NBD_STATE_ZERO = 1 << 1
export const BASE_ALLOCATION = 'base:allocation'

// Error values ("Error values"). Defined once, with the error table.
export {
  NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN
} from '../../errors.js'

// Frame sizes in bytes.
/** NBDMAGIC + IHAVEOPT + 16 bits of handshake flags. */
export const NBD_HANDSHAKE_SIZE = 18
export const NBD_CLIENT_FLAGS_SIZE = 4
/** IHAVEOPT, option, length. */
export const NBD_OPTION_HEADER_SIZE = 16
/** Magic, option, reply type, length. */
export const NBD_OPTION_REPLY_HEADER_SIZE = 20
/** Reply to NBD_OPT_EXPORT_NAME: size, flags, then 124 zero bytes unless NO_ZEROES. */
export const NBD_EXPORT_NAME_REPLY_SIZE = 10
export const NBD_EXPORT_NAME_ZEROES = 124
export const NBD_REQUEST_SIZE = 28
export const NBD_SIMPLE_REPLY_SIZE = 16
export const NBD_STRUCTURED_REPLY_HEADER_SIZE = 20

/**
 * "that string ... SHOULD be no longer than 256 bytes and MUST be no
 * longer than 4096 bytes" (Conventions).
 */
export const NBD_MAX_STRING = 4096

// Size constraints ("Size constraints"). This server has none beyond the
// defaults the spec recommends, and says so with NBD_INFO_BLOCK_SIZE.
export const MIN_BLOCK_SIZE = 1
export const PREFERRED_BLOCK_SIZE = 4096
/** "a maximum payload size that is at least 2^25 (33,554,432)". */
export const MAX_PAYLOAD = 2 ** 25

const OPTION_NAMES: Record<number, string> = {
  [NBD_OPT_EXPORT_NAME]: 'NBD_OPT_EXPORT_NAME',
  [NBD_OPT_ABORT]: 'NBD_OPT_ABORT',
  [NBD_OPT_LIST]: 'NBD_OPT_LIST',
  [NBD_OPT_PEEK_EXPORT]: 'NBD_OPT_PEEK_EXPORT',
  [NBD_OPT_STARTTLS]: 'NBD_OPT_STARTTLS',
  [NBD_OPT_INFO]: 'NBD_OPT_INFO',
  [NBD_OPT_GO]: 'NBD_OPT_GO',
  [NBD_OPT_STRUCTURED_REPLY]: 'NBD_OPT_STRUCTURED_REPLY',
  [NBD_OPT_LIST_META_CONTEXT]: 'NBD_OPT_LIST_META_CONTEXT',
  [NBD_OPT_SET_META_CONTEXT]: 'NBD_OPT_SET_META_CONTEXT',
  [NBD_OPT_EXTENDED_HEADERS]: 'NBD_OPT_EXTENDED_HEADERS'
}

const COMMAND_NAMES: Record<number, string> = {
  [NBD_CMD_READ]: 'NBD_CMD_READ',
  [NBD_CMD_WRITE]: 'NBD_CMD_WRITE',
  [NBD_CMD_DISC]: 'NBD_CMD_DISC',
  [NBD_CMD_FLUSH]: 'NBD_CMD_FLUSH',
  [NBD_CMD_TRIM]: 'NBD_CMD_TRIM',
  [NBD_CMD_CACHE]: 'NBD_CMD_CACHE',
  [NBD_CMD_WRITE_ZEROES]: 'NBD_CMD_WRITE_ZEROES',
  [NBD_CMD_BLOCK_STATUS]: 'NBD_CMD_BLOCK_STATUS',
  [NBD_CMD_RESIZE]: 'NBD_CMD_RESIZE'
}

/** The spec's name of an option, for messages. */
export function optionName (option: number): string {
  return OPTION_NAMES[option] ?? `option ${option}`
}

/** The spec's name of a command, for messages. */
export function commandName (type: number): string {
  return COMMAND_NAMES[type] ?? `command ${type}`
}

"""Messages between the policy runtime and the controller (ZeroMQ + msgpack); see docs/protocol.md."""

from __future__ import annotations

from runtime.protocol.codec import (  # noqa: F401
    COMMANDS,
    HEALTH,
    MAX_ERROR_TEXT,
    MAX_FRAME_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_REPLY_BYTES,
    MAX_REPLY_DETAIL,
    PROTOCOL_VERSION,
    ActionChunk,
    Command,
    DecodeError,
    Frame,
    Heartbeat,
    RejectCounter,
    Reply,
    RobotState,
    decode,
    decode_array,
    encode_array,
    encode_chunk,
    encode_command,
    encode_frame,
    encode_heartbeat,
    encode_reply,
    encode_state,
)

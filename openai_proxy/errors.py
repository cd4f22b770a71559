"""
The daemon's own ``Error`` / ``Warning`` codes.  They are stable: clients may branch on them.
docs/errors.md lists each with its meaning; an upstream ``error.code`` is passed through unchanged.
"""

from typing import Final

UNPARSABLE_CLIENT_MESSAGE: Final = "UNPARSABLE_CLIENT_MESSAGE"
UNSUPPORTED_CLIENT_MESSAGE: Final = "UNSUPPORTED_CLIENT_MESSAGE"
INVALID_CLIENT_MESSAGE: Final = "INVALID_CLIENT_MESSAGE"
INVALID_SETTINGS: Final = "INVALID_SETTINGS"
SETTINGS_REQUIRED: Final = "SETTINGS_REQUIRED"
UNKNOWN_FUNCTION_CALL: Final = "UNKNOWN_FUNCTION_CALL"
MODEL_REPLACED: Final = "MODEL_REPLACED"
AUDIO_BUFFER_OVERFLOW: Final = "AUDIO_BUFFER_OVERFLOW"
VOICE_LOCKED: Final = "VOICE_LOCKED"
SETTING_NOT_CHANGEABLE: Final = "SETTING_NOT_CHANGEABLE"
UNSUPPORTED_SETTING: Final = "UNSUPPORTED_SETTING"
TOO_MANY_REQUESTS: Final = "TOO_MANY_REQUESTS"
PROMPT_TOO_LONG: Final = "PROMPT_TOO_LONG"
UPSTREAM_UNAVAILABLE: Final = "UPSTREAM_UNAVAILABLE"
UPSTREAM_AUTH_FAILED: Final = "UPSTREAM_AUTH_FAILED"
UPSTREAM_RATE_LIMITED: Final = "UPSTREAM_RATE_LIMITED"
UPSTREAM_TLS_FAILED: Final = "UPSTREAM_TLS_FAILED"
UPSTREAM_TIMEOUT: Final = "UPSTREAM_TIMEOUT"
UPSTREAM_CLOSED: Final = "UPSTREAM_CLOSED"
UPSTREAM_ERROR: Final = "UPSTREAM_ERROR"
#: Warnings: the upstream connection was lost and is being re-established (SPEC §8), and it was.
UPSTREAM_RECONNECTING: Final = "UPSTREAM_RECONNECTING"
UPSTREAM_RECONNECTED: Final = "UPSTREAM_RECONNECTED"
SHUTTING_DOWN: Final = "SHUTTING_DOWN"
INTERNAL_ERROR: Final = "INTERNAL_ERROR"

#: Upstream error codes that are races the daemon tolerates: logged, never shown to the client.
BENIGN_UPSTREAM_CODES: Final = frozenset(
    {
        "conversation_already_has_active_response",
        "response_cancel_not_active",
        "input_audio_buffer_commit_empty",
    }
)

#: A response ended ``incomplete`` (``max_output_tokens``, ``content_filter``): a Warning.
RESPONSE_INCOMPLETE: Final = "RESPONSE_INCOMPLETE"
#: A response ended ``failed`` without an upstream error code: a Warning.
RESPONSE_FAILED: Final = "RESPONSE_FAILED"
#: The upstream could not transcribe the user's speech: a Warning; the reply goes on.
TRANSCRIPTION_FAILED: Final = "TRANSCRIPTION_FAILED"

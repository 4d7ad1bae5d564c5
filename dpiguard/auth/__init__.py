"""Who is asking: the user directory, login with two factors, sessions.

* :mod:`.users`    - accounts in Redis: argon2id passwords, TOTP secrets encrypted with the data key;
* :mod:`.login`    - the login decision (both factors on one form), lockouts, per-address throttling;
* :mod:`.sessions` - server-side sessions (Redis, in-process cache), the cookie/bearer token parser;
* :mod:`.qr`       - enrolment QR codes (terminal and PNG).
"""

from dpiguard.auth.login import Authenticator, LoginResult
from dpiguard.auth.sessions import Session, SessionStore, presented_token
from dpiguard.auth.users import SecretBox, User, UserDirectory

__all__ = ["Authenticator", "LoginResult", "Session", "SessionStore", "presented_token", "SecretBox", "User", "UserDirectory"]

"""Languages of what people read: gettext catalogues (Babel), dates in local time, Jinja2 i18n.

The texts of dpiguard's pages, refusal messages and reports are written in English in the code and
the templates (the gettext ``msgid``) and translated in catalogues a translator edits:
``dpiguard/locale/<lang>/LC_MESSAGES/messages.po`` (French: ``fr``). The ``.po`` file is the only
source: it is compiled in memory (Babel's ``read_po`` + ``write_mo``) the first time a language is
used, so there is no ``.mo`` file to rebuild or to forget. ``tests/test_i18n.py`` extracts every
message of the code and templates (Babel's extractors, ``babel.cfg``) and fails when one has no
translation, so a new English text cannot ship untranslated.

French is the default language (``ui.language``); a person's choice comes from the ``dpiguard_lang``
cookie (the switch on every page), then the browser's ``Accept-Language``. Times are shown in
``ui.timezone`` (default ``Europe/Paris``) with the language's formats (Babel ``format_datetime``).
"""

from __future__ import annotations

import functools
import gettext as _gettext
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping
from zoneinfo import ZoneInfo

from babel.dates import format_datetime, format_time
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations
from jinja2 import BaseLoader, Environment, StrictUndefined

LOCALE_DIR = Path(__file__).parent / "locale"
DOMAIN = "messages"
SOURCE_LANGUAGE = "en"  # the language of the msgids
SUPPORTED = ("fr", "en")
DEFAULT_LANGUAGE = "fr"
DEFAULT_TIMEZONE = "Europe/Paris"
LANG_COOKIE = "dpiguard_lang"
LANGUAGE_NAMES = {"fr": "Français", "en": "English"}


@functools.cache
def translations(lang: str) -> _gettext.NullTranslations:
    """The compiled catalogue of ``lang`` (the source language needs none)."""
    if lang == SOURCE_LANGUAGE or lang not in SUPPORTED:
        return _gettext.NullTranslations()
    path = LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po"
    with open(path, "rb") as fh:
        catalog = read_po(fh, locale=lang, domain=DOMAIN)
    buf = io.BytesIO()
    write_mo(buf, catalog, use_fuzzy=False)  # a fuzzy (unchecked) translation is not shown
    buf.seek(0)
    return Translations(buf, domain=DOMAIN)


def parse_accept_language(header: str) -> list[str]:
    """Language tags of an ``Accept-Language`` header, best first (``q=0`` dropped)."""
    ranked = []
    for position, part in enumerate(header.split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        if not tag or tag == "*":
            continue
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        if q > 0:
            ranked.append((-q, position, tag))
    return [tag for _, _, tag in sorted(ranked)]


def negotiate(headers: Mapping[str, str], available: Iterable[str] = SUPPORTED,
              default: str = DEFAULT_LANGUAGE) -> str:
    """The language of an answer: the person's switch (cookie), else the browser's first supported
    language, else ``default``. ``headers``: lower-case names."""
    available = tuple(available)
    cookie = headers.get("cookie", "")
    for part in cookie.split(";"):
        name, _, value = part.strip().partition("=")
        if name == LANG_COOKIE and value in available:
            return value
    for tag in parse_accept_language(headers.get("accept-language", "")):
        primary = tag.split("-", 1)[0]
        if primary in available:
            return primary
    return default if default in available else available[0]


@dataclass(frozen=True)
class Localizer:
    """Texts and times for one language and one time zone (cheap: the catalogue is shared)."""

    lang: str = DEFAULT_LANGUAGE
    tz_name: str = DEFAULT_TIMEZONE

    @property
    def tz(self) -> ZoneInfo:
        return _zone(self.tz_name)

    def gettext(self, message: str, **values: Any) -> str:
        text = translations(self.lang).gettext(message)
        return text % values if values else text

    def ngettext(self, singular: str, plural: str, n: int, **values: Any) -> str:
        text = translations(self.lang).ngettext(singular, plural, n)
        return text % dict(values, num=n)

    def _dt(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(float(epoch), timezone.utc)

    def clock(self, epoch: float | None) -> str:
        """``14:32`` (fr), ``2:32 PM`` (en), in the local time zone."""
        return "" if epoch is None else format_time(self._dt(epoch), "short", tzinfo=self.tz, locale=self.lang)

    def datetime(self, epoch: float | None) -> str:
        """``12 mars 2026, 14:32:05`` (fr), in the local time zone."""
        return "" if epoch is None else format_datetime(self._dt(epoch), "medium", tzinfo=self.tz, locale=self.lang)

    def short_datetime(self, epoch: float | None) -> str:
        """``12/03/2026 14:32`` (fr)."""
        return "" if epoch is None else format_datetime(self._dt(epoch), "short", tzinfo=self.tz, locale=self.lang)

    def iso(self, text: str | None) -> str:
        """A trace record's ``time`` (ISO UTC) shown as a local date and time; other text unchanged."""
        if not text:
            return ""
        try:
            dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
        except ValueError:
            return str(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return format_datetime(dt, "medium", tzinfo=self.tz, locale=self.lang)

    def duration(self, seconds: float) -> str:
        """``30 minutes``, ``4 heures``, ``1 heure 30 minutes`` ..."""
        seconds = max(0, int(round(seconds)))
        hours, rest = divmod(seconds, 3600)
        minutes, secs = divmod(rest, 60)
        parts = []
        if hours:
            parts.append(self.ngettext("%(num)d hour", "%(num)d hours", hours))
        if minutes:
            parts.append(self.ngettext("%(num)d minute", "%(num)d minutes", minutes))
        if secs and not hours:
            parts.append(self.ngettext("%(num)d second", "%(num)d seconds", secs))
        return " ".join(parts) or self.ngettext("%(num)d second", "%(num)d seconds", 0)

    def yes_no(self, value: Any) -> str:
        if value is None:
            return ""
        return self.gettext("yes") if value else self.gettext("no")


@functools.cache
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def environment(loader: BaseLoader, lang: str, **options: Any) -> Environment:
    """A Jinja2 environment whose templates are translated into ``lang`` (``{% trans %}``, ``_()``,
    new-style gettext: ``_("%(n)s pages", n=3)``, values escaped by autoescaping)."""
    env = Environment(loader=loader, autoescape=True, undefined=StrictUndefined, auto_reload=False,
                      extensions=["jinja2.ext.i18n"], **options)
    env.policies["ext.i18n.trimmed"] = True  # as babel.cfg extracts them: whitespace folded
    env.install_gettext_translations(translations(lang), newstyle=True)
    env.globals["lang"] = lang
    return env


class TemplateSet:
    """One Jinja2 environment per language over the same templates, built on first use."""

    def __init__(self, loader: BaseLoader, filters: Mapping[str, Any] | None = None, **options: Any):
        self.loader = loader
        self.filters = dict(filters or {})
        self.options = options
        self._envs: dict[str, Environment] = {}

    def env(self, lang: str) -> Environment:
        env = self._envs.get(lang)
        if env is None:
            env = environment(self.loader, lang, **self.options)
            env.filters.update(self.filters)
            self._envs[lang] = env  # a race builds it twice; either copy is correct
        return env

    def render(self, name: str, l10n: Localizer, **context: Any) -> str:
        return self.env(l10n.lang).get_template(name).render(context, L=l10n)

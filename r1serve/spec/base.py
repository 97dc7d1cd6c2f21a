"""Base class and reusable field types shared by every section of the R1Deployment spec."""

import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

from r1serve.spec import quantity


class SpecModel(BaseModel):
    """Frozen, camelCase-aliased base of every spec section."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        # A misspelt key must fail loudly: silently ignoring `maxBatchToken` would run the
        # cluster with a default nobody asked for.
        extra="forbid",
        frozen=True,
        # No lax coercion: `min: false` or `port: "9000"` would pass as 0 and 9000 here while the CRD
        # schema refuses them, so a spec `r1serve serve` runs could never be applied.
        strict=True,
    )


DNS_1035_LABEL_PATTERN = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS_1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
# [.] instead of \. keeps the spec's patterns embeddable in the CRD's CEL string literals.
DNS_1123_SUBDOMAIN_PATTERN = re.compile(
    r"[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Kubernetes label keys and values (apimachinery's IsQualifiedName and IsValidLabelValue): a key is
# an optional DNS-subdomain prefix and '/', then a name of at most 63 characters; a value is empty
# or such a name.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
LABEL_KEY_PATTERN = re.compile(f"({DNS_1123_SUBDOMAIN_PATTERN.pattern}/)?{_LABEL_NAME}")
LABEL_PREFIX_LENGTH_PATTERN = re.compile(r"([^/]{1,253}/)?[^/]*")
LABEL_VALUE_PATTERN = re.compile(f"({_LABEL_NAME})?")
LABEL_KEY_RULE = ("must be a Kubernetes label key: an optional DNS subdomain prefix of at most 253 "
                  "characters and '/', then at most 63 letters, digits, '-', '_' or '.', starting "
                  "and ending with a letter or digit")
LABEL_VALUE_RULE = ("must be a Kubernetes label value: empty or at most 63 letters, digits, '-', "
                    "'_' or '.', starting and ending with a letter or digit")

# Derived objects append suffixes such as "-prefill-worker-abcde" and must stay within
# Kubernetes' 63-character label limit, so the resource name itself is kept shorter.
MAX_NAME_LENGTH = 40


def _matching(value: str, pattern: re.Pattern, max_length: int, rule: str) -> str:
    if len(value) > max_length:
        raise ValueError(f"must be at most {max_length} characters (is {len(value)})")
    if not pattern.fullmatch(value):
        raise ValueError(rule)
    return value


def check_dns_1035_label(value: str) -> str:
    """Kubernetes resource names that become Service names must be DNS-1035 labels."""
    return _matching(value, DNS_1035_LABEL_PATTERN, MAX_NAME_LENGTH,
                     "must be a DNS-1035 label: lowercase letters, digits and '-', "
                     "starting with a letter and ending with a letter or digit")


def check_dns_1123_label(value: str) -> str:
    return _matching(value, _DNS_1123_LABEL, 63,
                     "must be a DNS-1123 label: at most 63 lowercase letters, digits and '-', "
                     "starting and ending with a letter or digit")


def check_dns_1123_subdomain(value: str) -> str:
    return _matching(value, DNS_1123_SUBDOMAIN_PATTERN, 253,
                     "must be a Kubernetes object name (DNS-1123 subdomain): lowercase letters, "
                     "digits, '-' and '.', starting and ending with a letter or digit")


def is_label_key(value: str) -> bool:
    return bool(LABEL_KEY_PATTERN.fullmatch(value) and LABEL_PREFIX_LENGTH_PATTERN.fullmatch(value))


def is_label_value(value: str) -> bool:
    return bool(LABEL_VALUE_PATTERN.fullmatch(value))


def check_env_name(value: str) -> str:
    if not ENV_NAME_PATTERN.fullmatch(value):
        raise ValueError("must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    return value


def check_no_whitespace(value: str) -> str:
    if not value or any(ch.isspace() for ch in value):
        raise ValueError("must be non-empty and contain no whitespace")
    return value


def _number_to_text(value: Any) -> Any:
    # YAML reads `cpu: 8` as an int; Kubernetes accepts it (an int64 in an int-or-string field), so
    # normalise to the string form. A YAML float is what the CRD refuses: ask for the string form.
    if isinstance(value, float):
        raise ValueError(f"write fractional quantities as a string, e.g. '{value}' or '500m'")
    if isinstance(value, int) and not isinstance(value, bool):
        if not -(2**63) <= value < 2**63:
            raise ValueError("is out of range for a Kubernetes quantity (a 64-bit integer)")
        return str(value)
    return value


Quantity = Annotated[str, BeforeValidator(_number_to_text), AfterValidator(quantity.check)]
ObjectName = Annotated[str, AfterValidator(check_dns_1123_subdomain)]
NonBlank = Annotated[str, AfterValidator(check_no_whitespace)]

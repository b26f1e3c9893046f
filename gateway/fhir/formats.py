"""FHIR JSON and XML on the wire: content negotiation, parsing and rendering.

XML is converted with the fhir.resources R4B models (which know FHIR's XML rules: primitive
``value`` attributes, repeated elements, ``div`` narrative); JSON is read with orjson.
"""

from __future__ import annotations

from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from lxml import etree

from gateway.errors import NotAcceptable, ParseError, UnsupportedMediaType

JSON = "json"
XML = "xml"
FHIR_JSON = "application/fhir+json"
FHIR_XML = "application/fhir+xml"
JSON_PATCH = "application/json-patch+json"
FORM = "application/x-www-form-urlencoded"

_JSON_TYPES = {FHIR_JSON, "application/json", "application/json+fhir", "text/json"}
_XML_TYPES = {FHIR_XML, "application/xml", "application/xml+fhir", "text/xml"}
_FORMAT_ALIASES = {
    "json": JSON, "application/json": JSON, FHIR_JSON: JSON, "application/json+fhir": JSON,
    "xml": XML, "text/xml": XML, "application/xml": XML, FHIR_XML: XML,
    "application/xml+fhir": XML, "html": JSON, "text/html": JSON,
}


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


#: what a request body may be labelled with (HTTP 415 for anything else)
ACCEPTED_BODY_TYPES = (FHIR_JSON, "application/json", FHIR_XML, "application/xml", "text/xml")
FHIR_VERSION = "4.0"  # the ``fhirVersion`` MIME parameter of FHIR R4


def _media_params(content_type: str) -> dict[str, str]:
    params = {}
    for part in content_type.split(";")[1:]:
        key, _, value = part.partition("=")
        params[key.strip().lower()] = value.strip().strip('"').lower()
    return params


def body_format(content_type: str | None, body: bytes) -> str:
    """JSON or XML for a request body, from its Content-Type (parameters ``charset=utf-8`` and
    ``fhirVersion=4.0`` allowed). Only a body sent without any Content-Type is sniffed; any
    other media type is refused with 415, as HTTP and FHIR say."""
    if content_type is None or not content_type.strip():
        return XML if body.lstrip()[:1] == b"<" else JSON
    mt = media_type(content_type)
    if mt in _JSON_TYPES:
        fmt = JSON
    elif mt in _XML_TYPES:
        fmt = XML
    else:
        hint = (" (curl labels --data as a form unless told otherwise: add "
                f"-H 'Content-Type: {FHIR_JSON}')" if mt == FORM else "")
        raise UnsupportedMediaType(
            f"Content-Type {mt or content_type.strip()!r} is not a FHIR format: send the "
            f"resource as JSON with Content-Type: {FHIR_JSON} (or as XML with {FHIR_XML})"
            f"{hint}. Accepted: {', '.join(ACCEPTED_BODY_TYPES)}", "Content-Type")
    params = _media_params(content_type)
    charset = params.get("charset")
    if charset is not None and charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(
            f"Content-Type says charset={charset}: FHIR bodies are UTF-8; send "
            f"{mt}; charset=utf-8", "Content-Type")
    version = params.get("fhirversion")
    if version is not None and version not in (FHIR_VERSION, "4.0.0", "4.0.1"):
        raise UnsupportedMediaType(
            f"Content-Type says fhirVersion={version}: refgw speaks FHIR R4 only "
            f"(fhirVersion={FHIR_VERSION})", "Content-Type")
    return fmt


def accepted(accept: str | None) -> list[str]:
    """The media types of an Accept header, most preferred first (by ``q``, then by order),
    without those it refuses (``q=0``)."""
    ranked = []
    for i, part in enumerate((accept or "").split(",")):
        bits = [b.strip() for b in part.split(";")]
        q = 1.0
        for b in bits[1:]:
            if b.startswith("q="):
                try:
                    q = float(b[2:])
                except ValueError:
                    q = 0.0
        if q > 0:
            ranked.append((-q, i, media_type(bits[0])))
    return [mt for _q, _i, mt in sorted(ranked)]


def response_format(accept: str | None, format_param: str | None) -> str:
    """JSON or XML for the response, from ``_format`` (wins) or the Accept header."""
    if format_param:
        fmt = _FORMAT_ALIASES.get(media_type(format_param.replace(" ", "+")))
        if fmt is None:
            raise NotAcceptable(f"_format={format_param!r} is not supported: use json or xml",
                                "_format")
        return fmt
    if not accept:
        return JSON
    for mt in accepted(accept):
        if mt in _JSON_TYPES or mt in ("*/*", "application/*", "text/html", "*"):
            return JSON
        if mt in _XML_TYPES:
            return XML
    raise NotAcceptable(f"None of the media types in Accept ({accept!r}) can be produced: "
                        "use application/fhir+json or application/fhir+xml", "Accept")


MAX_DEPTH = 100  # far deeper than any real resource; keeps recursive walkers off the stack limit


def _check_depth(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ParseError(f"The body nests objects and arrays more than {MAX_DEPTH} levels "
                             "deep; no FHIR resource needs that")
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


def clone(data: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, str, numbers, bool, None) through orjson:
    ~10x cheaper than ``copy.deepcopy`` for a FHIR resource."""
    return orjson.loads(orjson.dumps(data))


def parse_json(body: bytes) -> Any:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ParseError(f"The body is not valid JSON: {exc}") from exc
    if isinstance(data, (dict, list)):
        _check_depth(data)
    return data


def parse_body(body: bytes, fmt: str) -> dict[str, Any]:
    """A resource dict from a JSON or XML body (any resource type the models know)."""
    if not body.strip():
        raise ParseError("The request has no body; send a FHIR resource")
    if fmt == JSON:
        data = parse_json(body)
        if not isinstance(data, dict):
            raise ParseError("The body must be a JSON object (a FHIR resource)")
        return data
    return xml_to_dict(body)


_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def xml_to_dict(body: bytes) -> dict[str, Any]:
    try:
        root = etree.fromstring(body, parser=_PARSER)
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"The body is not well-formed XML: {exc}") from exc
    stack = [(root, 1)]
    while stack:  # the models recurse per level: refuse absurd nesting before they run
        el, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ParseError(f"The body nests elements more than {MAX_DEPTH} levels deep; "
                             "no FHIR resource needs that")
        stack.extend((child, depth + 1) for child in el)
    qname = etree.QName(root)
    if qname.namespace != "http://hl7.org/fhir":
        raise ParseError(f"The XML root <{qname.localname}> is not in the FHIR namespace "
                         "(xmlns=\"http://hl7.org/fhir\")")
    try:
        cls = get_fhir_model_class(qname.localname)
    except Exception as exc:
        raise ParseError(f"<{qname.localname}> is not a FHIR resource type") from exc
    try:
        model = cls.model_validate_xml(body)
    except Exception as exc:
        from gateway.fhir.validate import issues_from_exception
        from gateway.errors import Unprocessable

        raise Unprocessable(issues=issues_from_exception(exc, qname.localname)) from exc
    return orjson.loads(model.model_dump_json())


def render(resource: dict[str, Any], fmt: str, pretty: bool = False) -> bytes:
    if fmt == JSON:
        return orjson.dumps(resource, option=orjson.OPT_INDENT_2 if pretty else 0)
    return dict_to_xml(resource, pretty)


def dict_to_xml(resource: dict[str, Any], pretty: bool = False) -> bytes:
    cls = get_fhir_model_class(resource["resourceType"])
    model = cls.model_validate(resource)
    xml = model.model_dump_xml()
    if pretty:
        root = etree.fromstring(xml, parser=_PARSER)
        return etree.tostring(root, pretty_print=True, xml_declaration=True, encoding="UTF-8")
    return xml


def content_type(fmt: str) -> str:
    return (FHIR_JSON if fmt == JSON else FHIR_XML) + "; charset=utf-8"

// loopgpt API reference (docs.html): fetches /openapi.json and renders every operation and schema.
// Built with DOM nodes and textContent only (no innerHTML), so nothing in the document can inject markup.
"use strict";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function refName(ref) { return ref.split("/").pop(); }

function refLink(ref) { return el("a", { href: `#schema-${refName(ref)}`, class: "type" }, refName(ref)); }

// A schema as a short type expression: string | array of integer | GenerateBody ...
function typeOf(schema) {
  if (!schema) return el("span", { class: "type" }, "any");
  if (schema.$ref) return refLink(schema.$ref);
  const span = el("span", { class: "type" });
  const branches = schema.anyOf || schema.oneOf;
  if (branches) {
    branches.forEach((b, i) => { if (i) span.append(" | "); span.append(typeOf(b)); });
    return span;
  }
  if (schema.type === "array") { span.append("array of ", typeOf(schema.items)); return span; }
  if (schema.type === "object" && schema.additionalProperties) {
    span.append("map of ", typeOf(schema.additionalProperties)); return span;
  }
  span.append(schema.const !== undefined ? JSON.stringify(schema.const) : schema.type || "any");
  return span;
}

const CONSTRAINTS = ["minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum", "minLength", "maxLength",
  "minItems", "maxItems", "enum"];

// Constraints of a schema and of its branches: "minimum 1, maximum 24".
function constraints(schema) {
  const parts = [];
  for (const s of [schema, ...(schema.anyOf || []), ...(schema.items ? [schema.items] : [])]) {
    for (const key of CONSTRAINTS) if (s[key] !== undefined) parts.push(`${key} ${JSON.stringify(s[key])}`);
  }
  return parts.join(", ");
}

function propertiesTable(schema) {
  const table = el("table", {}, el("tr", {}, el("th", {}, "field"), el("th", {}, "type"),
    el("th", {}, "constraints"), el("th", {}, "default"), el("th", {}, "description")));
  const required = new Set(schema.required || []);
  for (const [name, prop] of Object.entries(schema.properties || {})) {
    const field = el("td", {}, el("code", {}, name));
    if (required.has(name)) field.append(el("span", { class: "required", title: "required" }, " *"));
    table.append(el("tr", {}, field, el("td", {}, typeOf(prop)), el("td", {}, constraints(prop)),
      el("td", {}, prop.default === undefined ? "" : JSON.stringify(prop.default)),
      el("td", {}, prop.description || "")));
  }
  return table;
}

function operation(path, method, op) {
  const card = el("article", { class: "op" },
    el("h3", {}, el("span", { class: `method ${method}` }, method.toUpperCase()), path),
    el("div", {}, op.summary || ""));
  if (op.security) card.append(el("div", { class: "muted" }, "needs Authorization: Bearer <key>"));
  if (op.parameters && op.parameters.length) {
    const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "type"),
      el("th", {}, "constraints"), el("th", {}, "description")));
    for (const p of op.parameters) {
      table.append(el("tr", {}, el("td", {}, el("code", {}, p.name)), el("td", {}, p.in),
        el("td", {}, typeOf(p.schema)), el("td", {}, constraints(p.schema || {})), el("td", {}, p.description || "")));
    }
    card.append(el("h4", {}, "Parameters"), table);
  }
  const body = op.requestBody && op.requestBody.content;
  if (body) {
    card.append(el("h4", {}, "Request body"));
    for (const [type, media] of Object.entries(body)) card.append(el("div", {}, `${type}: `, typeOf(media.schema)));
  }
  const table = el("table", {}, el("tr", {}, el("th", {}, "status"), el("th", {}, "content"),
    el("th", {}, "description")));
  for (const [status, resp] of Object.entries(op.responses || {})) {
    const content = el("td", {});
    for (const [type, media] of Object.entries(resp.content || {})) {
      content.append(el("div", {}, `${type}: `, typeOf(media.schema)));
    }
    table.append(el("tr", {}, el("td", {}, status), content, el("td", {}, resp.description || "")));
  }
  card.append(el("h4", {}, "Responses"), table);
  return card;
}

async function main() {
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new Error(`GET /openapi.json: ${response.status}`);
  const doc = await response.json();
  $("title").textContent = doc.info.title;
  $("version").textContent = `version ${doc.info.version}`;
  $("description").textContent = doc.info.description || "";
  for (const [path, methods] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(methods)) $("operations").append(operation(path, method, op));
  }
  for (const [name, schema] of Object.entries((doc.components || {}).schemas || {})) {
    const card = el("article", { class: "schema", id: `schema-${name}` }, el("h3", {}, name));
    if (schema.description) card.append(el("div", {}, schema.description));
    card.append(schema.properties ? propertiesTable(schema) : el("div", {}, typeOf(schema)));
    $("schemas").append(card);
  }
  document.body.dataset.ready = "true";
}

main().catch((e) => { $("error").textContent = String(e); document.body.dataset.ready = "error"; });

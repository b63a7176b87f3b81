#!/usr/bin/env node
// A tiny hand-written DOM, just big enough to run the inline script of the attention page
// that `llmscratch.inspect.attention_html` writes, with no browser and no npm packages.
//
//   node tests/js/dom_shim.js page.html actions.json
//
// reads the page, builds one element per `id="..."` in it (the <script id="attention-data">
// gets its raw text as textContent, as in a browser), runs the page's last inline <script>
// (the one without an id) with Node's `vm` module in a context whose only globals are
// `document` and `console`, then performs the actions and prints a JSON report on stdout:
//
//   {"scripts": [{"id", "type", "length"}...],       every <script> of the page, in order
//    "states": [state after loading, state after action 1, ...]}
//
// A state is {layer: {value, options: [{value, text}]}, head: {...},
//             tokens: [{text, className, background, color}]   (the children of #tokens),
//             info: "...",                                       (#info's text)
//             rows: [{className, cells: [{tag, text, className, background, title}]}]}  (#map)
//
// actions.json is a list of events to dispatch, e.g.
//   [{"event": "change", "target": "layer", "value": 1},     select option "1", then "change"
//    {"event": "mouseenter", "target": "token", "index": 3},  the 4th child of #tokens
//    {"event": "mouseleave", "target": "row", "index": 4},    the 5th row of #map
//    {"event": "mouseenter", "target": "info"}]               any element by id
//
// Anything that goes wrong (a script error, a DOM feature this shim lacks, a bad action)
// is written to stderr and the exit status is 1, so a broken page fails the test.
//
// Only what the page uses is implemented. Elements are Proxies that throw on any other
// property, so a script that starts using more of the DOM fails loudly here instead of
// silently reading `undefined`.

"use strict";

const fs = require("fs");
const vm = require("vm");

// ------------------------------------------------------------------ elements

/** A list of class names backed by the element's `className` string. */
class ClassList {
  constructor(element) {
    this._element = element;
  }
  _names() {
    return this._element.className.split(/\s+/).filter(Boolean);
  }
  _set(names) {
    this._element.className = names.join(" ");
  }
  contains(name) {
    return this._names().includes(String(name));
  }
  add(...names) {
    const have = this._names();
    for (const n of names.map(String)) if (!have.includes(n)) have.push(n);
    this._set(have);
  }
  remove(...names) {
    const drop = names.map(String);
    this._set(this._names().filter((n) => !drop.includes(n)));
  }
  /** Like the DOM: with `force` it adds (truthy) or removes (falsy); returns whether it is now present. */
  toggle(name, force) {
    const on = force === undefined ? !this.contains(name) : Boolean(force);
    if (on) this.add(name);
    else this.remove(name);
    return on;
  }
}

/** The two style properties the page sets. Values are kept as written (a browser would normalise them). */
class Style {
  constructor() {
    this._background = "";
    this._color = "";
  }
  get background() { return this._background; }
  set background(v) { this._background = String(v); }
  get color() { return this._color; }
  set color(v) { this._color = String(v); }
}

/** What an element's own properties may be named; anything else read or written throws. */
const KNOWN = new Set([
  "tagName", "id", "children", "parentNode", "className", "classList", "style", "title",
  "textContent", "innerHTML", "value", "rows", "cells", "options", "selectedIndex",
  "appendChild", "addEventListener", "dispatchEvent", "insertRow", "insertCell",
]);

class Element {
  constructor(tagName, id = "") {
    this.tagName = String(tagName).toUpperCase();
    this.id = id;
    this.children = [];
    this.parentNode = null;
    this.className = "";
    this.classList = new ClassList(this);
    this.style = new Style();
    this.title = "";
    this.selectedIndex = -1; // <select> only: which option is chosen
    this._text = ""; // own text (an element has text or children, never both here)
    this._value = null; // <option>: set value; null means "use the text", as in the DOM
    this._listeners = {};
    // Fail loudly on DOM features this shim does not have.
    return new Proxy(this, {
      get(target, prop, receiver) {
        if (typeof prop === "symbol" || prop.startsWith("_") || KNOWN.has(prop) || prop in target) {
          return Reflect.get(target, prop, receiver);
        }
        throw new Error(`dom_shim: <${target.tagName.toLowerCase()}>.${prop} is not implemented`);
      },
      set(target, prop, value, receiver) {
        if (typeof prop === "string" && !prop.startsWith("_") && !KNOWN.has(prop)) {
          throw new Error(`dom_shim: setting <${target.tagName.toLowerCase()}>.${prop} is not implemented`);
        }
        return Reflect.set(target, prop, value, receiver);
      },
    });
  }

  appendChild(child) {
    if (!(child instanceof Element)) throw new Error("dom_shim: appendChild needs an element");
    if (this._text) throw new Error("dom_shim: mixing text and child elements is not implemented");
    if (child.parentNode) {
      const siblings = child.parentNode.children;
      siblings.splice(siblings.indexOf(child), 1);
    }
    child.parentNode = this;
    this.children.push(child);
    if (this.tagName === "SELECT" && this.selectedIndex < 0 && child.tagName === "OPTION") {
      this.selectedIndex = 0; // a <select> with options shows (and has the value of) the first
    }
    return child;
  }

  /** All the text inside, like the DOM's textContent; setting it replaces every child. */
  get textContent() {
    return this._text + this.children.map((c) => c.textContent).join("");
  }
  set textContent(v) {
    this._removeChildren();
    this._text = v === null || v === undefined ? "" : String(v);
  }

  /** Only clearing (`el.innerHTML = ""`) is implemented: parsing HTML is not this shim's job. */
  get innerHTML() {
    throw new Error("dom_shim: reading innerHTML is not implemented");
  }
  set innerHTML(v) {
    if (v !== "") throw new Error("dom_shim: only innerHTML = \"\" (clearing) is implemented");
    this._removeChildren();
    this._text = "";
  }

  _removeChildren() {
    for (const c of this.children) c.parentNode = null;
    this.children = [];
    if (this.tagName === "SELECT") this.selectedIndex = -1;
  }

  /** <select>: the chosen option's value (a string); <option>: its value, or its text if none was set. */
  get value() {
    if (this.tagName === "SELECT") {
      const chosen = this.options[this.selectedIndex];
      return chosen ? chosen.value : "";
    }
    if (this.tagName === "OPTION") return this._value === null ? this.textContent : this._value;
    return this._value === null ? "" : this._value;
  }
  set value(v) {
    v = String(v);
    if (this.tagName === "SELECT") {
      this.selectedIndex = this.options.findIndex((o) => o.value === v); // -1 when none matches
    } else {
      this._value = v;
    }
  }

  get options() {
    this._need("SELECT", "options");
    return this.children.filter((c) => c.tagName === "OPTION");
  }

  // -------------------------------------------------------------- tables

  /** <table>: a new <tr> appended at the end (a browser would put it in an implied <tbody>). */
  insertRow() {
    this._need("TABLE", "insertRow");
    return this.appendChild(new Element("tr"));
  }
  /** <tr>: a new <td> appended at the end. */
  insertCell() {
    this._need("TR", "insertCell");
    return this.appendChild(new Element("td"));
  }
  /** <table>: its rows, in order (a plain array, which is all `Array.prototype.forEach.call` needs). */
  get rows() {
    this._need("TABLE", "rows");
    return this.children.filter((c) => c.tagName === "TR");
  }
  /** <tr>: its <th> and <td> cells, in order. */
  get cells() {
    this._need("TR", "cells");
    return this.children.filter((c) => c.tagName === "TD" || c.tagName === "TH");
  }

  _need(tag, what) {
    if (this.tagName !== tag) {
      throw new Error(`dom_shim: ${what} exists on <${tag.toLowerCase()}>, not <${this.tagName.toLowerCase()}>`);
    }
  }

  // -------------------------------------------------------------- events

  addEventListener(type, listener) {
    if (typeof listener !== "function") throw new Error("dom_shim: a listener must be a function");
    (this._listeners[type] = this._listeners[type] || []).push(listener);
  }

  /**
   * Calls this element's listeners for `type` in the order they were added. No bubbling:
   * mouseenter, mouseleave and change on a <select> are all the page needs, and the first
   * two do not bubble in a browser either. A listener's error propagates (and fails the run).
   */
  dispatchEvent(type) {
    const event = { type, target: this, currentTarget: this };
    for (const listener of (this._listeners[type] || []).slice()) listener.call(this, event);
    return true;
  }
}

// ------------------------------------------------------------------ the page

/** The text of a script ends at the first `</script` followed by a space, `/` or `>` (any case). */
const SCRIPT_END = /<\/script[\s\/>]/i;

/** Attributes of an opening tag, as {name: value} with lower-case names (no entity decoding). */
function parseAttributes(text) {
  const attrs = {};
  const re = /([^\s=\/>]+)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>]+)))?/g;
  let m;
  while ((m = re.exec(text)) !== null) {
    attrs[m[1].toLowerCase()] = m[2] ?? m[3] ?? m[4] ?? "";
  }
  return attrs;
}

/**
 * Scans the page's tags (skipping comments and the raw text of <script> and <style>) and
 * returns {elements: {id: Element}, scripts: [{id, type, text}]}. Elements with an id start
 * empty, except a <script>, whose textContent is its raw text, as in a browser.
 *
 * It is stricter than a browser in one way: a script whose text holds `<!--` or `<script`
 * is an error, since those put a browser's parser into states where `</script>` may not end
 * the script; the page must escape them, and this makes sure it did.
 */
function parsePage(html) {
  const elements = {};
  const scripts = [];
  const tag = /<!--[\s\S]*?-->|<(\/?)([a-zA-Z][a-zA-Z0-9-]*)((?:[^>"']|"[^"]*"|'[^']*')*)>/g;
  let m;
  while ((m = tag.exec(html)) !== null) {
    if (m[0].startsWith("<!--") || m[1]) continue; // a comment or a closing tag
    const name = m[2].toLowerCase();
    const attrs = parseAttributes(m[3]);
    const element = new Element(name, attrs.id || "");
    if (attrs.id !== undefined) {
      if (elements[attrs.id]) throw new Error(`dom_shim: the id "${attrs.id}" appears twice in the page`);
      elements[attrs.id] = element;
    }
    if (name === "script" || name === "style") {
      const rest = html.slice(tag.lastIndex);
      const end = name === "script" ? rest.search(SCRIPT_END) : rest.search(/<\/style[\s\/>]/i);
      if (end < 0) throw new Error(`dom_shim: a <${name}> is never closed`);
      const text = rest.slice(0, end);
      if (name === "script") {
        const bad = text.match(/<!--|<script/i);
        if (bad) throw new Error(`dom_shim: a <script> holds "${bad[0]}"; it must be escaped`);
        element.textContent = text;
        scripts.push({ id: attrs.id ?? null, type: attrs.type ?? null, text });
      }
      tag.lastIndex += end; // carry on at its closing tag
    }
  }
  return { elements, scripts };
}

/** The `document` the page's script sees. */
class Document {
  constructor(elements) {
    this._elements = elements;
  }
  getElementById(id) {
    return this._elements[String(id)] || null;
  }
  createElement(tagName) {
    return new Element(tagName);
  }
}

/** Parses `html`, runs its last inline script without an id, and returns {document, scripts}. */
function loadPage(html) {
  const { elements, scripts } = parsePage(html);
  const inline = scripts.filter((s) => s.id === null);
  if (!inline.length) throw new Error("dom_shim: the page has no inline <script> without an id");
  const document = new Document(elements);
  const context = vm.createContext({ document, console });
  vm.runInContext(inline[inline.length - 1].text, context, { filename: "attention-page-script.js", timeout: 5000 });
  return { document, scripts };
}

// ------------------------------------------------------------------ what the test sees

function byId(document, id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`dom_shim: the page has no element with id "${id}"`);
  return element;
}

/** Everything the Python test asserts on, as plain JSON. */
function snapshot(document) {
  const select = (id) => {
    const sel = byId(document, id);
    return { value: sel.value, options: sel.options.map((o) => ({ value: o.value, text: o.textContent })) };
  };
  const look = (el) => ({ text: el.textContent, className: el.className,
                          background: el.style.background, color: el.style.color });
  return {
    layer: select("layer"),
    head: select("head"),
    tokens: byId(document, "tokens").children.map(look),
    info: byId(document, "info").textContent,
    rows: byId(document, "map").rows.map((r) => ({
      className: r.className,
      cells: r.cells.map((c) => ({ tag: c.tagName.toLowerCase(), ...look(c), title: c.title })),
    })),
  };
}

/** The element an action points at: "token" (a child of #tokens), "row" (of #map) or an id. */
function actionTarget(document, action) {
  const pick = (list, what) => {
    const el = list[action.index];
    if (!el) throw new Error(`dom_shim: there is no ${what} ${action.index} (there are ${list.length})`);
    return el;
  };
  if (action.target === "token") return pick(byId(document, "tokens").children, "token");
  if (action.target === "row") return pick(byId(document, "map").rows, "row");
  return byId(document, action.target);
}

/** Performs one action: for "change", first selects the option with `value` (which must exist). */
function perform(document, action) {
  const target = actionTarget(document, action);
  if (action.event === "change") {
    target.value = action.value;
    if (target.selectedIndex < 0) throw new Error(`dom_shim: <select id="${target.id}"> has no option ${action.value}`);
  } else if (action.event !== "mouseenter" && action.event !== "mouseleave") {
    throw new Error(`dom_shim: unknown event ${JSON.stringify(action.event)}`);
  }
  target.dispatchEvent(action.event);
}

/** Loads the page, performs `actions`, and returns the report described at the top. */
function run(html, actions) {
  const { document, scripts } = loadPage(html);
  const states = [snapshot(document)];
  for (const action of actions) {
    perform(document, action);
    states.push(snapshot(document));
  }
  return { scripts: scripts.map((s) => ({ id: s.id, type: s.type, length: s.text.length })), states };
}

module.exports = { Element, Document, parsePage, loadPage, snapshot, run };

if (require.main === module) {
  const [pagePath, actionsPath] = process.argv.slice(2);
  if (!pagePath) {
    process.stderr.write("usage: node dom_shim.js page.html [actions.json]\n");
    process.exit(2);
  }
  try {
    const html = fs.readFileSync(pagePath, "utf8");
    const actions = actionsPath ? JSON.parse(fs.readFileSync(actionsPath, "utf8")) : [];
    process.stdout.write(JSON.stringify(run(html, actions)) + "\n");
  } catch (err) {
    process.stderr.write(`${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  }
}

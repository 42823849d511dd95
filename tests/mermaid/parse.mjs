// Parse Mermaid diagrams with the mermaid package itself (its own parser; jsdom stands in for the
// browser DOM it expects, so nothing has to download a browser).
// stdin: a JSON list of diagram texts. stdout: a JSON list of
//   {ok: true, type, states: [...]} (states for state diagrams) or {ok: false, error}.
import { JSDOM } from "jsdom";

const dom = new JSDOM("<!doctype html><html><body></body></html>", { pretendToBeVisual: true });
globalThis.window = dom.window;
globalThis.document = dom.window.document;
const { default: mermaid } = await import("mermaid");
mermaid.initialize({ startOnLoad: false });

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = [];
for (const text of JSON.parse(input)) {
  try {
    const parsed = await mermaid.parse(text);
    let states = null;
    const diagram = await mermaid.mermaidAPI.getDiagramFromText(text);
    if (diagram.db && typeof diagram.db.getStates === "function") {
      states = [...diagram.db.getStates().keys()];
    }
    results.push({ ok: true, type: parsed.diagramType, states });
  } catch (e) {
    results.push({ ok: false, error: String((e && e.message) || e) });
  }
}
process.stdout.write(JSON.stringify(results));

// Shows the text summary a LoRA node returns (ui.text) in a read-only box on the node once it
// has run, and a button that opens the chart full size.
// The summary starts with its key lines (file, size, ranks, errors, skipped and flagged counts),
// then a blank line, then the full report. The box is always tall enough for the key lines
// (wrapped at the node's width); the rest scrolls below them. The node keeps its width, so a
// run never pushes it over its neighbours.
// Nothing runs at import: the only top-level statement registers the extension.

window.comfyAPI.app.app.registerExtension({
  name: "lora_extract.reportSummary",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const ourNodes = ["LoraExtract", "LoraExtractV2", "LoraResize", "LoraValidate"];
    if (!ourNodes.includes(nodeData?.name)) return;

    const FONT_PX = 11;
    const LINE_PX = 14;        // CSS line-height of the box
    // The frontend draws a DOM widget 2 x its 10-px margin smaller than the height it is given;
    // then the textarea's own padding and border.
    const BOX_PAD_PX = 28;
    const SIDE_PX = 36;        // node width minus the box's text width (widget margins, padding, scrollbar)
    const MAX_KEY_LINES = 8;

    const previous = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      previous?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
      if (typeof text !== "string" || text.length === 0) return;
      showSummary(this, text);
      if (Array.isArray(message?.images) && message.images.length) addChartButton(this);
    };

    // The key lines: the block before the first blank line (or the first few lines).
    function keyLines(text) {
      const lines = text.split("\n");
      const blank = lines.findIndex((l) => l.trim() === "");
      return lines.slice(0, blank > 0 ? Math.min(blank, MAX_KEY_LINES) : Math.min(lines.length, 6));
    }

    let charPx = null;
    function charWidth() {
      if (charPx === null) {
        charPx = 0.61 * FONT_PX; // DejaVu Sans Mono and most monospace fonts: 0.6 em
        const ctx = globalThis.document?.createElement?.("canvas")?.getContext?.("2d");
        if (ctx) {
          ctx.font = `${FONT_PX}px monospace`;
          charPx = ctx.measureText("0".repeat(40)).width / 40 || charPx;
        }
      }
      return charPx;
    }

    // Rows the lines take once the box wraps them at the node's width.
    function rows(lines, nodeWidth) {
      const perRow = Math.max(10, Math.floor((nodeWidth - SIDE_PX) / charWidth()));
      return lines.reduce((n, l) => n + Math.max(1, Math.ceil(l.length / perRow)), 0);
    }

    // Height the text takes in the box as rendered (padding included), measured on a hidden
    // copy of the box at the width the node gives it (the box's own width lags behind while the
    // node is laid out); null without a page. Cached: the frontend asks on every layout.
    const WIDGET_MARGIN_PX = 10; // the frontend's margin around a DOM widget
    const MARGINS_PX = 24;       // 2 x that margin, the border, and 2 px to spare
    let cache = { key: null, height: null };
    function measuredHeight(el, text, width) {
      const doc = globalThis.document;
      if (!doc?.body || !el || !(width > 0)) return null;
      const cacheKey = `${width}|${text}`;
      if (cache.key === cacheKey) return cache.height;
      const probe = el.cloneNode(false);
      Object.assign(probe.style, { position: "fixed", left: "-10000px", top: "0", height: "0px",
                                   width: `${width}px`, boxSizing: "border-box", border: "0" });
      probe.value = text;
      doc.body.appendChild(probe);
      const height = probe.scrollHeight;
      probe.remove();
      cache = { key: cacheKey, height };
      return height;
    }

    // The widget is created on first use, so a node that never ran keeps its usual size.
    function showSummary(node, text) {
      let widget = node.widgets?.find((w) => w.name === "summary");
      if (!widget) {
        const { ComfyWidgets } = window.comfyAPI.widgets;
        widget = ComfyWidgets.STRING(node, "summary", ["STRING", { multiline: true }], window.comfyAPI.app.app).widget;
        widget.serialize = false; // display only: never sent back as an input
        if (widget.inputEl) {
          Object.assign(widget.inputEl.style, {
            opacity: "0.9", fontFamily: "monospace", fontSize: `${FONT_PX}px`,
            lineHeight: `${LINE_PX}px`, whiteSpace: "pre-wrap",
          });
          widget.inputEl.readOnly = true;
        }
        // The frontend gives a DOM widget at least getMinHeight() and at most getMaxHeight().
        widget.options = widget.options ?? {};
        widget.options.getMinHeight = () => {
          const key = keyLines(String(widget.value ?? ""));
          const measured = measuredHeight(widget.inputEl, key.join("\n"), node.size[0] - 2 * WIDGET_MARGIN_PX);
          return measured !== null ? measured + MARGINS_PX : rows(key, node.size[0]) * LINE_PX + BOX_PAD_PX;
        };
        widget.options.getMaxHeight = () => rows(String(widget.value ?? "").split("\n"), node.size[0]) * LINE_PX + BOX_PAD_PX;
      }
      widget.value = text;
      if (widget.inputEl) widget.inputEl.scrollTop = 0;
      const size = node.computeSize();
      node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
      node.setDirtyCanvas?.(true, true);
    }

    function addChartButton(node) {
      if (node.widgets?.some((w) => w.name === "open chart full size")) return;
      const button = node.addWidget?.("button", "open chart full size", null, () => openFullSize(node));
      if (button) button.serialize = false;
    }

    // The chart at its real size over the page, as ComfyUI's own image viewer shows images;
    // a click or Escape closes it.
    function openFullSize(node) {
      const img = node.imgs?.[node.imageIndex ?? 0] ?? node.imgs?.[0];
      if (!img?.src || !globalThis.document) return;
      const url = new URL(img.src, window.location.href);
      url.searchParams.delete("preview");
      const overlay = document.createElement("div");
      overlay.className = "lora-extract-chart-viewer";
      Object.assign(overlay.style, {
        position: "fixed", inset: "0", zIndex: "10000", overflow: "auto", cursor: "zoom-out",
        background: "rgba(0, 0, 0, 0.85)", display: "flex", alignItems: "flex-start",
        justifyContent: "center", padding: "16px", boxSizing: "border-box",
      });
      const full = document.createElement("img");
      full.src = url.toString();
      full.alt = "LoRA report chart";
      Object.assign(full.style, { maxWidth: "none", background: "#fff" });
      overlay.appendChild(full);
      const close = () => { overlay.remove(); document.removeEventListener("keydown", onKey, true); };
      const onKey = (e) => { if (e.key === "Escape") { e.stopPropagation(); close(); } };
      overlay.addEventListener("click", close);
      document.addEventListener("keydown", onKey, true);
      document.body.appendChild(overlay);
    }
  },
});

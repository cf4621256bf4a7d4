// Shows the text summary a LoRA node returns (ui.text: ranks, file size, mean error, time,
// warnings) in a read-only box on the node once it has run.
// Nothing runs at import: the only top-level statement registers the extension.

window.comfyAPI.app.app.registerExtension({
  name: "lora_extract.reportSummary",

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const ourNodes = ["LoraExtract", "LoraExtractV2", "LoraResize", "LoraValidate"];
    if (!ourNodes.includes(nodeData?.name)) return;

    const previous = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      previous?.apply(this, arguments);
      const text = Array.isArray(message?.text) ? message.text.join("\n") : message?.text;
      if (typeof text !== "string" || text.length === 0) return;
      showSummary(this, text);
    };

    // The widget is created on first use, so a node that never ran keeps its usual size.
    function showSummary(node, text) {
      let widget = node.widgets?.find((w) => w.name === "summary");
      if (!widget) {
        const { ComfyWidgets } = window.comfyAPI.widgets;
        widget = ComfyWidgets.STRING(node, "summary", ["STRING", { multiline: true }], window.comfyAPI.app.app).widget;
        widget.serialize = false; // display only: never sent back as an input
        if (widget.inputEl) {
          widget.inputEl.readOnly = true;
          widget.inputEl.style.opacity = "0.85";
          widget.inputEl.style.fontFamily = "monospace";
          widget.inputEl.style.fontSize = "11px";
        }
      }
      widget.value = text;
      const size = node.computeSize();
      node.setSize([Math.max(node.size[0], size[0], 420), Math.max(node.size[1], size[1])]);
      node.setDirtyCanvas?.(true, true);
    }
  },
});

// Live status on a running LoRA node: the server sends "layer i/n: key" as progress text
// (PromptServer.send_progress_text). ComfyUI's frontend (1.2x and later) shows that text inside
// the node itself (its "$$node-text-preview" widget); only where it does not, this draws the
// latest line just below the node (clear of the title badges and of the running outline) and
// clears it when the node finishes. Nothing runs at import beyond registering the extension.

window.comfyAPI.app.app.registerExtension({
  name: "lora_extract.liveStatus",

  async setup() {
    const app = window.comfyAPI.app.app;
    const { api } = window.comfyAPI.api;
    const ourNodes = new Set(["LoraExtract", "LoraExtractV2", "LoraResize", "LoraValidate"]);

    // Progress text carries the executing node's id; inside a subgraph it is a path "a:b".
    const findNode = (nodeId) => {
      const id = String(nodeId ?? "").split(":").pop();
      const node = app.graph?.getNodeById(Number(id)) ?? app.graph?.getNodeById(id);
      return node && ourNodes.has(node.comfyClass ?? node.type) ? node : null;
    };
    const setStatus = (node, text) => {
      node.loraExtractStatus = text;
      node.setDirtyCanvas?.(true, false);
    };

    api.addEventListener("progress_text", ({ detail }) => {
      const node = findNode(detail?.nodeId);
      if (node) setStatus(node, String(detail.text ?? ""));
    });
    const clearAll = () => {
      for (const node of app.graph?._nodes ?? []) {
        if (node.loraExtractStatus) setStatus(node, "");
      }
    };
    api.addEventListener("executed", ({ detail }) => {
      const node = findNode(detail?.display_node ?? detail?.node);
      if (node) setStatus(node, "");
    });
    api.addEventListener("execution_error", clearAll);
    api.addEventListener("execution_interrupted", clearAll);
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const ourNodes = ["LoraExtract", "LoraExtractV2", "LoraResize", "LoraValidate"];
    if (!ourNodes.includes(nodeData?.name)) return;
    const FRONTEND_TEXT_WIDGET = "$$node-text-preview";
    const previous = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      previous?.apply(this, arguments);
      const text = this.loraExtractStatus;
      if (!text || this.flags?.collapsed) return;
      // The frontend shows the progress text itself: once is enough.
      if (this.widgets?.some((w) => w.name === FRONTEND_TEXT_WIDGET)) return;
      ctx.save();
      ctx.font = "11px monospace";
      ctx.fillStyle = "#8fc";
      // Keep the end of long keys: it names the layer.
      const max = Math.max(8, Math.floor((this.size[0] - 12) / 6.6));
      const shown = text.length > max ? "..." + text.slice(text.length - max + 3) : text;
      // Below the node's body: the running outline is drawn a few px outside it.
      ctx.fillText(shown, 6, this.size[1] + 18);
      ctx.restore();
    };
  },
});

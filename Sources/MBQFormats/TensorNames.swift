/// How a family names the tensors around its decoder blocks, relative to the decoder's
/// prefix (docs/DESIGN.md §4.1).
public struct DecoderNaming: Sendable, Equatable {
    /// Layer 0's first norm, relative to "\(base)layers.0.": what finds the prefix.
    public var inputNorm: String
    public var embedTokens: String
    public var finalNorm: String
    /// Full names of the output projection, tried in order.
    public var lmHeads: [String]

    /// The Hugging Face Llama layout, which Llama, Qwen2 and Qwen2-VL share.
    public static let huggingFace = DecoderNaming(inputNorm: "input_layernorm.weight", embedTokens: "embed_tokens.weight",
                                                  finalNorm: "norm.weight", lmHeads: ["lm_head.weight", "language_model.lm_head.weight"])
}

/// Where the language model's tensors live in a checkpoint. VLM wrappers put the same
/// decoder under different prefixes depending on the family and on the transformers
/// version that saved them; this is the one place that knows them.
public struct LanguageModelTensorNames: Sendable, Equatable {
    /// Prefix of the decoder, e.g. "language_model.model." — layers are "\(base)layers.N."
    public let base: String
    /// The output projection, or nil when the embeddings are tied to it.
    public let lmHead: String?
    public let naming: DecoderNaming

    public init(base: String, lmHead: String?, naming: DecoderNaming = .huggingFace) {
        self.base = base; self.lmHead = lmHead; self.naming = naming
    }

    /// Decoder prefixes in the order they are tried.
    /// - `language_model.model.`  LLaVA / LLaVA-OneVision saved by transformers < 4.52; InternVL2 (internvl_chat)
    /// - `model.language_model.`  the same families saved by transformers >= 4.52
    /// - `model.`                  Llama, Qwen2, Qwen2-VL (classic names)
    /// - `language_model.`         transformers >= 4.52 base-model checkpoints
    public static let decoderPrefixes = ["language_model.model.", "model.language_model.", "model.", "language_model.", ""]

    /// Finds the prefix from the tensor list: the first candidate that has layer 0's
    /// input norm (vision towers name their norms differently, so a CLIP or SigLIP
    /// encoder's `layers.0.` is never taken for the decoder).
    public static func detect(in names: Set<String>, tied: Bool, place: String,
                              naming: DecoderNaming = .huggingFace) throws -> LanguageModelTensorNames {
        guard let base = decoderPrefixes.first(where: { names.contains("\($0)layers.0.\(naming.inputNorm)") }) else {
            throw FormatsError.missingTensor(name: "layers.0.\(naming.inputNorm) (under any of \(decoderPrefixes.filter { !$0.isEmpty }))", in: place)
        }
        let head = naming.lmHeads.first { names.contains($0) }
        if head == nil && !tied {
            throw FormatsError.missingTensor(name: "\(naming.lmHeads[0]) (and tie_word_embeddings is false)", in: place)
        }
        return LanguageModelTensorNames(base: base, lmHead: head, naming: naming)
    }

    public var embedTokens: String { base + naming.embedTokens }
    public var finalNorm: String { base + naming.finalNorm }
    /// lm_head, or the embedding matrix when tied.
    public var outputProjection: String { lmHead ?? embedTokens }

    public func layer(_ i: Int) -> String { "\(base)layers.\(i)." }

    /// The tensors of decoder block `i` in the Hugging Face Llama layout, one stored
    /// tensor per linear.
    public func block(_ i: Int, config: LanguageModelConfig) -> BlockTensorNames {
        let p = layer(i)
        let names = ["q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"]
        return BlockTensorNames(
            inputNorm: p + "input_layernorm.weight",
            postAttentionNorm: p + "post_attention_layernorm.weight",
            linears: config.linearShapes.map { StoredLinear(name: p + names[$0.role]! + ".weight", role: $0.role, rows: $0.shape[0]) },
            qBias: config.qkvBias ? p + "self_attn.q_proj.bias" : nil,
            kBias: config.qkvBias ? p + "self_attn.k_proj.bias" : nil,
            vBias: config.qkvBias ? p + "self_attn.v_proj.bias" : nil,
            oBias: config.oBias ? p + "self_attn.o_proj.bias" : nil)
    }
}

/// One linear weight tensor as a checkpoint stores it: the row-wise concatenation of
/// pieces of the engine's linears (q, k, v, o, gate, up, down; each [out, in]). A family
/// that fuses linears (InternLM2's `wqkv`) stores several roles' rows in one tensor;
/// loading splits it, writing re-fuses it in the same order.
public struct StoredLinear: Sendable, Equatable {
    public struct Piece: Sendable, Equatable {
        public var role: String
        /// Rows of the role's [out, in] matrix.
        public var rows: Range<Int>
        public init(role: String, rows: Range<Int>) { self.role = role; self.rows = rows }
    }

    /// The checkpoint name (".weight").
    public var name: String
    /// In stored row order.
    public var pieces: [Piece]

    public init(name: String, pieces: [Piece]) { self.name = name; self.pieces = pieces }
    /// One role stored whole.
    public init(name: String, role: String, rows: Int) { self.init(name: name, pieces: [Piece(role: role, rows: 0..<rows)]) }

    /// The module name (what packed formats append their suffixes to).
    public var module: String { String(name.dropLast(".weight".count)) }
    public var rows: Int { pieces.reduce(0) { $0 + $1.rows.count } }
    public var roles: [String] {
        var r: [String] = []
        for p in pieces where !r.contains(p.role) { r.append(p.role) }
        return r
    }

    /// Splits a stored [rows, cols] row-major buffer into each role's rows (pieces of a
    /// role must cover its rows exactly once; `roleRows` gives each role's row count).
    public func split<E>(_ stored: [E], cols: Int, roleRows: [String: Int], zero: E) -> [String: [E]] {
        precondition(stored.count == rows * cols, "\(name): \(stored.count) values for \(rows) x \(cols)")
        var out: [String: [E]] = [:]
        for r in roles { out[r] = [E](repeating: zero, count: roleRows[r]! * cols) }
        var at = 0
        for p in pieces {
            out[p.role]!.replaceSubrange(p.rows.lowerBound * cols..<p.rows.upperBound * cols, with: stored[at * cols..<(at + p.rows.count) * cols])
            at += p.rows.count
        }
        return out
    }

    /// The stored [rows, cols] row-major buffer from each role's rows.
    public func fuse<E>(_ roles: [String: [E]], cols: Int) -> [E] {
        var out: [E] = []
        out.reserveCapacity(rows * cols)
        for p in pieces { out += roles[p.role]![p.rows.lowerBound * cols..<p.rows.upperBound * cols] }
        return out
    }
}

/// Checkpoint names of one decoder block's tensors.
public struct BlockTensorNames: Sendable, Equatable {
    public let inputNorm, postAttentionNorm: String
    /// The stored linear weights, in the order the family stores them.
    public let linears: [StoredLinear]
    public let qBias, kBias, vBias, oBias: String?

    public init(inputNorm: String, postAttentionNorm: String, linears: [StoredLinear],
                qBias: String?, kBias: String?, vBias: String?, oBias: String?) {
        self.inputNorm = inputNorm; self.postAttentionNorm = postAttentionNorm; self.linears = linears
        self.qBias = qBias; self.kBias = kBias; self.vBias = vBias; self.oBias = oBias
    }

    /// The stored tensor holding `role`'s rows.
    public func stored(_ role: String) -> StoredLinear? { linears.first { $0.roles.contains(role) } }

    public var all: [String] {
        [inputNorm, postAttentionNorm] + linears.map(\.name) + [qBias, kBias, vBias, oBias].compactMap { $0 }
    }
}

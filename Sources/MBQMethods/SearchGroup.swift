import MBQModel
import MBQTensor

/// The four scaling groups of a Llama/Qwen2 block (docs/DESIGN.md §2).
public enum SearchGroup: String, CaseIterable, Sendable {
    /// input_layernorm -> q, k, v; compared on the whole self-attention.
    case qkv
    /// v_proj -> o_proj; compared on o_proj (only without GQA).
    case o
    /// post_attention_layernorm -> gate, up; compared on the whole MLP.
    case gateUp = "gate_up"
    /// up_proj -> down_proj; compared on down_proj.
    case down

    /// Everything the search, the apply, the captures, GPTQ and the cost model know of
    /// this group: one row of `SearchGroupSpec.table`.
    public var spec: SearchGroupSpec {
        guard let row = SearchGroupSpec.table.first(where: { $0.group == self }) else {
            preconditionFailure("SearchGroupSpec.table has no row for \(self)")
        }
        return row
    }

    /// Judged on the attention's output (its loss takes the attention's modality ratio).
    public var isAttention: Bool { spec.judged == \BlockCaptures<Float>.attentionOutput }
}

/// One search group as a row of a table (docs/DESIGN.md §2, after the authors'
/// `auto_scale_block`): the linears its scales multiply, the op before them whose output
/// channels the scales divide, the captured input the linears read, the module the
/// candidates run through and the captured output they are judged on. (Key paths are
/// not `Sendable`: the table is built where it is read.)
public struct SearchGroupSpec {
    public typealias Linear = (role: String, path: WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>>)

    /// The op whose output the scales divide (so the block computes the same function).
    public enum PreviousOp {
        /// An RMSNorm's weight vector.
        case norm(WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>>)
        /// A linear's output rows, and its bias when it has one.
        case linearRows(WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>>,
                        bias: WritableKeyPath<DecoderBlockWeights<Float>, Tensor<Float>?>?)
    }

    /// What a candidate runs: the whole self-attention, the scaled linear alone (with
    /// its bias, if the block has one), or the whole MLP.
    public enum Module {
        case attention
        case linear(bias: KeyPath<DecoderBlockWeights<Float>, Tensor<Float>?>?)
        case mlp
    }

    public let group: SearchGroup
    public let linears: [Linear]
    public let previous: PreviousOp
    /// The captured input of the scaled linears. [T, C_in]
    public let input: WritableKeyPath<BlockCaptures<Float>, Tensor<Float>>
    public let module: Module
    /// The captured fp output the candidates are compared with. [T, C]
    public let judged: WritableKeyPath<BlockCaptures<Float>, Tensor<Float>>

    /// The roles of the linears the group scales, in `DecoderBlockWeights.linears` order.
    public var roles: [String] { linears.map(\.role) }

    /// Whether a block with these v_proj / o_proj shapes searches this group: the
    /// authors search o only when v_proj and o_proj have the same shape (no grouped-query
    /// attention); every other group always.
    public func isSearched(vShape: [Int], oShape: [Int]) -> Bool {
        group != .o || vShape == oShape
    }

    public static var table: [SearchGroupSpec] {
        [SearchGroupSpec(group: .qkv, linears: [("q", \.q), ("k", \.k), ("v", \.v)], previous: .norm(\.inputNorm),
                         input: \.qkvInput, module: .attention, judged: \.attentionOutput),
         SearchGroupSpec(group: .o, linears: [("o", \.o)], previous: .linearRows(\.v, bias: \.vBias),
                         input: \.oInput, module: .linear(bias: \.oBias), judged: \.attentionOutput),
         SearchGroupSpec(group: .gateUp, linears: [("gate", \.gate), ("up", \.up)], previous: .norm(\.postAttentionNorm),
                         input: \.gateUpInput, module: .mlp, judged: \.mlpOutput),
         SearchGroupSpec(group: .down, linears: [("down", \.down)], previous: .linearRows(\.up, bias: nil),
                         input: \.downInput, module: .linear(bias: nil), judged: \.mlpOutput)]
    }
}

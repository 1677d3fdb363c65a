import MBQModel
import MBQTensor

/// Block tensors by role, for the apply phase's transfer.
public enum BlockTensors {
    public static func roles(_ w: DecoderBlockWeights<Float>) -> [(String, Tensor<Float>)] {
        var r: [(String, Tensor<Float>)] = [("input_norm", w.inputNorm), ("post_norm", w.postAttentionNorm), ("q", w.q), ("k", w.k),
                                            ("v", w.v), ("o", w.o), ("gate", w.gate), ("up", w.up), ("down", w.down)]
        if let b = w.qBias { r.append(("q_bias", b)) }
        if let b = w.kBias { r.append(("k_bias", b)) }
        if let b = w.vBias { r.append(("v_bias", b)) }
        if let b = w.oBias { r.append(("o_bias", b)) }
        return r
    }

    /// Rebuilds a block from its role tensors.
    public static func block(_ t: [String: Tensor<Float>], shape: AttentionShape, eps: Double) -> DecoderBlockWeights<Float> {
        DecoderBlockWeights(inputNorm: t["input_norm"]!, postAttentionNorm: t["post_norm"]!, q: t["q"]!, k: t["k"]!, v: t["v"]!,
                            o: t["o"]!, qBias: t["q_bias"], kBias: t["k_bias"], vBias: t["v_bias"], oBias: t["o_bias"],
                            gate: t["gate"]!, up: t["up"]!, down: t["down"]!, shape: shape, rmsNormEps: eps)
    }
}

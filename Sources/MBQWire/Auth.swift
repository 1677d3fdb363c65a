import MBQTensor

/// Shared-secret authentication of workers (used when the job has a secret; CurveZMQ,
/// which also encrypts, is the stronger option — see README). The coordinator answers a
/// registration with a Challenge holding a fresh random nonce; the worker registers again
/// with HMAC-SHA256(secret, "mbq-register|job|worker|" + nonce), and the coordinator
/// accepts each nonce once: a recorded registration cannot be replayed, nor used for
/// another job.
public enum Auth {
    public static func token(secret: String, jobID: String, workerID: String, nonce: [UInt8]) -> [UInt8] {
        hmacSHA256(key: Array(secret.utf8), message: Array("mbq-register|\(jobID)|\(workerID)|".utf8) + nonce)
    }

    public static func verify(secret: String, jobID: String, workerID: String, nonce: [UInt8], token: [UInt8]) -> Bool {
        constantTimeEqual(self.token(secret: secret, jobID: jobID, workerID: workerID, nonce: nonce), token)
    }

    /// 16 bytes from the system's random source (getrandom on Linux).
    public static func nonce() -> [UInt8] {
        var g = SystemRandomNumberGenerator()
        return (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
    }

    /// Equality whose time does not depend on where the bytes differ.
    public static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var diff: UInt8 = 0
        for i in 0..<a.count { diff |= a[i] ^ b[i] }
        return diff == 0
    }

    public static func hmacSHA256(key: [UInt8], message: [UInt8]) -> [UInt8] {
        var k = key.count > 64 ? SHA256.digest(key) : key
        k += [UInt8](repeating: 0, count: 64 - k.count)
        let inner = SHA256.digest(k.map { $0 ^ 0x36 } + message)
        return SHA256.digest(k.map { $0 ^ 0x5c } + inner)
    }
}

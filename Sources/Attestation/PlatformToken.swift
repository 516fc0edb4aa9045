import Authority
import Encoding

/// Why a platform token (or a key set, or a discovery document) was
/// refused: a stable `code` for programs and a sentence for people (the
/// authority's error type). Never carries the token itself.
public typealias AttestationError = AuthorityError

/// A platform's ID token (a compact JWS carrying JWT claims), parsed
/// strictly and not yet trusted: nothing here has been verified.
///
/// Refused before any key is looked at: more than `bytesMax` bytes (checked
/// before splitting), anything but three base64url segments without
/// padding, JSON that is not an object or has duplicate keys or is nested
/// too deep, `alg` none or HMAC, a header that points at keys (`jku`,
/// `x5u`, `jwk`, `x5c`) or carries `crit`, any header parameter not listed
/// in `headerParameters`, a missing or oddly spelled `kid`, and a missing
/// `iss`.
public struct PlatformToken: Sendable {
    public static let bytesMax = 16 << 10
    /// Header parameters a platform token may carry: GitHub adds `x5t`.
    public static let headerParameters: Set<String> = ["alg", "kid", "typ", "x5t", "x5t#S256"]
    static let headerLimits = StrictJSON.Limits(bytesMax: 8 << 10, depthMax: 3, valuesMax: 64)
    static let claimsLimits = StrictJSON.Limits(bytesMax: bytesMax, depthMax: 4, valuesMax: 512)

    /// The signed envelope: header checks done, payload not read.
    public let jws: CompactJWS
    public let claims: JSONValue
    /// The `iss` claim, exactly as sent.
    public let issuer: String

    public var algorithm: String { jws.algorithm }
    public var keyID: String { jws.keyID }
    public var signingInput: [UInt8] { jws.signingInput }
    public var signature: [UInt8] { jws.signature }

    public init(parsing text: String) throws(AttestationError) {
        jws = try CompactJWS(parsing: text, keyIDRequired: true)
        let claims: JSONValue
        do {
            claims = try StrictJSON.parseObject(jws.payload, limits: Self.claimsLimits)
        } catch {
            throw AttestationError("malformed_token", "the claims are not a plain JSON object: \(error)")
        }
        guard let issuer = claims["iss"]?.stringValue, !issuer.isEmpty else { throw AttestationError("missing_issuer", "the token has no 'iss' claim") }
        self.claims = claims
        self.issuer = issuer
    }

    /// Key ids are looked up, never used as paths; still, anything but a
    /// plain name is refused so logs and errors stay unambiguous.
    public static func isPlainKeyID(_ kid: String) -> Bool {
        let bytes = Array(kid.utf8)
        guard (1...128).contains(bytes.count) else { return false }
        guard bytes.allSatisfy({ (0x30...0x39).contains($0) || (0x41...0x5A).contains($0) || (0x61...0x7A).contains($0) || $0 == 0x2D || $0 == 0x5F || $0 == 0x2E })
        else { return false }
        // (By bytes: Foundation's contains(_:) was a tenth of parsing a token.)
        return !zip(bytes, bytes.dropFirst()).contains { $0 == 0x2E && $1 == 0x2E }
    }

    /// `text` for an error message: at most 64 bytes, control characters
    /// shown as '?'.
    public static func printable(_ text: String) -> String {
        String(String.UnicodeScalarView(text.unicodeScalars.prefix(64).map { $0.value < 0x20 || $0.value == 0x7F ? "?" : $0 }))
    }
}

/// A compact JWS as a platform token's envelope, header checked: size,
/// three unpadded base64url segments, a strict JSON header with only the
/// allowed parameters, no `none` or HMAC, a plain `kid`.
public struct CompactJWS: Sendable {
    public let algorithm: String
    public let keyID: String
    /// `header.payload`, the bytes the signature covers.
    public let signingInput: [UInt8]
    public let payload: [UInt8]
    public let signature: [UInt8]

    /// `keyIDRequired: false` is for test vectors without a kid (whose key
    /// id is then "").
    public init(parsing text: String, keyIDRequired: Bool) throws(AttestationError) {
        let bytes = Array(text.utf8)
        guard !bytes.isEmpty else { throw AttestationError("malformed_token", "the token is empty") }
        guard bytes.count <= PlatformToken.bytesMax else {
            throw AttestationError("token_too_large", "the token is \(bytes.count) bytes; the limit is \(PlatformToken.bytesMax)")
        }
        let dots = bytes.indices.filter { bytes[$0] == 0x2E }
        guard dots.count == 2 else {
            throw AttestationError("malformed_token", "a token is three base64url segments separated by dots; this one has \(dots.count + 1)")
        }
        let segments = [bytes[..<dots[0]], bytes[(dots[0] + 1)..<dots[1]], bytes[(dots[1] + 1)...]]
        var decoded: [[UInt8]] = []
        for (index, segment) in segments.enumerated() {
            let name = ["header", "payload", "signature"][index]
            guard !segment.isEmpty else { throw AttestationError("malformed_token", "the \(name) segment is empty") }
            guard let value = Base64URL.decode(segment) else {
                throw AttestationError("malformed_token", "the \(name) segment is not base64url without padding")
            }
            decoded.append(value)
        }
        let header: JSONValue
        do {
            header = try StrictJSON.parseObject(decoded[0], limits: PlatformToken.headerLimits)
        } catch {
            throw AttestationError("malformed_token", "the header is not a plain JSON object: \(error)")
        }
        guard case .object(let members) = header else { throw AttestationError("malformed_token", "the header is not a JSON object") }
        for (name, _) in members where !PlatformToken.headerParameters.contains(name) {
            switch name {
            case "jku", "x5u", "jwk", "x5c":
                throw AttestationError("key_in_header", "the header names its own key ('\(name)'); keys come only from the issuer's configured JWKS")
            case "crit":
                throw AttestationError("critical_header", "the header has 'crit' extensions, which are not supported")
            default:
                throw AttestationError("unsupported_header", "the header parameter '\(PlatformToken.printable(name))' is not supported")
            }
        }
        guard let algorithm = header["alg"]?.stringValue else { throw AttestationError("malformed_token", "the header has no 'alg'") }
        if algorithm.lowercased() == "none" { throw AttestationError("algorithm_not_allowed", "unsigned tokens (alg none) are refused") }
        if algorithm.hasPrefix("HS") { throw AttestationError("algorithm_not_allowed", "HMAC tokens (\(PlatformToken.printable(algorithm))) are refused") }
        if let typ = header["typ"], typ != .string("JWT") {
            throw AttestationError("malformed_token", "the header's typ must be JWT when present")
        }
        let keyID = header["kid"]?.stringValue ?? (keyIDRequired || header["kid"] != nil ? nil : "")
        guard let keyID else { throw AttestationError("missing_kid", "the header has no 'kid'") }
        guard PlatformToken.isPlainKeyID(keyID) || (!keyIDRequired && keyID.isEmpty) else {
            throw AttestationError("bad_kid", "the kid must be 1 to 128 letters, digits, '-', '_' or '.' (no '..')")
        }
        self.algorithm = algorithm
        self.keyID = keyID
        signingInput = Array(bytes[..<dots[1]])
        payload = decoded[1]
        signature = decoded[2]
    }
}

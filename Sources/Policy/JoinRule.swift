import Attestation
import Authority
import Crypto
import Yams

/// One claim condition of a join rule. Values are compared as bytes: no
/// case folding, no Unicode normalization.
public struct Condition: Sendable, Hashable {
    public enum Operator: String, Sendable, Hashable, CaseIterable {
        case equals, oneOf = "one_of", glob, notEquals = "not_equals", notOneOf = "not_one_of", notGlob = "not_glob"
        var negated: Bool { self == .notEquals || self == .notOneOf || self == .notGlob }
    }

    public var claim: String
    public var op: Operator
    public var values: [String]

    public init(claim: String, op: Operator, values: [String]) {
        self.claim = claim
        self.op = op
        self.values = values
    }

    /// Whether `value` (nil: the token lacks the claim) satisfies it. A
    /// missing claim satisfies no condition, negated ones included.
    public func holds(for value: String?) -> Bool {
        guard let value else { return false }
        let matched: Bool
        switch op {
        case .equals, .notEquals, .oneOf, .notOneOf: matched = values.contains { $0.utf8.elementsEqual(value.utf8) }
        case .glob, .notGlob: matched = values.contains { Glob.matches(pattern: $0, value) }
        }
        return matched != op.negated
    }

    public var summary: String {
        let shown = values.count == 1 ? "\"\(values[0])\"" : "[" + values.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
        return "\(claim) \(op.rawValue) \(shown)"
    }
}

/// Anchored globs over the whole value: `*` matches any run of characters
/// except `/` and `:`; everything else matches itself, byte for byte.
public enum Glob {
    public static func matches(pattern: String, _ value: String) -> Bool {
        let p = Array(pattern.utf8), v = Array(value.utf8)
        // Iterative matching with one backtrack point (linear in practice;
        // no recursion an attacker could deepen).
        var pi = 0, vi = 0
        var star = -1, mark = 0
        while vi < v.count {
            if pi < p.count, p[pi] == 0x2A {
                star = pi
                mark = vi
                pi += 1
            } else if pi < p.count, p[pi] == v[vi] {
                pi += 1
                vi += 1
            } else if star >= 0, v[mark] != 0x2F, v[mark] != 0x3A {
                mark += 1
                vi = mark
                pi = star + 1
            } else {
                return false
            }
        }
        while pi < p.count, p[pi] == 0x2A { pi += 1 }
        return pi == p.count
    }
}

/// A join rule: the document `policy/join/<name>`. All conditions must
/// hold; any rule may allow.
///
/// ```yaml
/// issuer: github                 # a policy/issuers/<name> document
/// spiffe_id: spiffe://example.org/gh/{repository}/{workflow}
/// ttl_max_seconds: 3600
/// max_lifetime_seconds: 21600   # renewals end this long after the join
/// conditions:
///   repository_owner_id: "1342004"          # equals
///   ref: {one_of: [refs/heads/main, refs/heads/release]}
///   workflow_ref: {glob: "acme/api/.github/workflows/*.yml@refs/heads/main"}
///   event_name: {not_one_of: [pull_request_target]}
/// ```
public struct JoinRule: Sendable, Hashable {
    public static let documentPrefix = "policy/join/"
    static let keys: Set<String> = ["issuer", "spiffe_id", "ttl_max_seconds", "max_lifetime_seconds", "conditions", "description"]
    public static let conditionsMax = 32
    public static let valuesMax = 64

    public var name: String
    public var issuer: String
    public var spiffeIDTemplate: String
    public var ttlMaxSeconds: UInt32
    public var maxLifetimeSeconds: UInt32
    public var conditions: [Condition]

    public init(name: String, issuer: String, spiffeIDTemplate: String, ttlMaxSeconds: UInt32 = 3_600, maxLifetimeSeconds: UInt32 = 21_600,
                conditions: [Condition]) {
        self.name = name
        self.issuer = issuer
        self.spiffeIDTemplate = spiffeIDTemplate
        self.ttlMaxSeconds = ttlMaxSeconds
        self.maxLifetimeSeconds = maxLifetimeSeconds
        self.conditions = conditions
    }

    /// Reads a rule; `method` (its issuer's, when known) checks claim
    /// names, and `trustDomain` the template.
    public init(name: String, document: String, method: JoinMethod?, trustDomain: String) throws(PolicyError) {
        let section = try YAMLSection.parse(document, keys: Self.keys)
        let issuer = try section.string("issuer")
        let template = try section.string("spiffe_id")
        try Self.checkTemplate(template, method: method, trustDomain: trustDomain)
        let ttl = try section.integer("ttl_max_seconds", in: 1...86_400, default: 3_600)
        let lifetime = try section.integer("max_lifetime_seconds", in: ttl...(7 * 86_400), default: max(ttl, 21_600))
        guard let conditionSection = try section.section("conditions", keys: nil) else {
            throw PolicyError(path: "conditions", problem: "is missing: a rule without conditions would admit every token of its issuer")
        }
        var conditions: [Condition] = []
        for claim in conditionSection.keys {
            let path = conditionSection.path(claim)
            try Self.checkClaimName(claim, method: method, path: path)
            guard let node = conditionSection.node(claim) else { continue }
            conditions.append(try Self.condition(claim, node, path))
        }
        guard !conditions.isEmpty else { throw PolicyError(path: "conditions", problem: "must hold at least one condition") }
        guard conditions.count <= Self.conditionsMax else { throw PolicyError(path: "conditions", problem: "at most \(Self.conditionsMax) conditions") }
        self.init(name: name, issuer: issuer, spiffeIDTemplate: template, ttlMaxSeconds: UInt32(ttl), maxLifetimeSeconds: UInt32(lifetime),
                  conditions: conditions)
    }

    /// What the rule admits, as 16 hex digits of a SHA-256 over its
    /// issuer, SPIFFE ID template, TTL caps and conditions, written in one
    /// form whatever way the document says them: conditions sorted by
    /// claim; values sorted and each once; `equals`, `one_of` and a `glob`
    /// without `*` as one set of values, their negations as another. The
    /// description and the document's layout count for nothing. An identity
    /// carries it, with its issuer's, as `rule_digest`
    /// (`JoinPolicy.admissionDigest`): nothing derives from the identity
    /// (renewals, JWT-SVIDs, steps) once the rule admits something else.
    public var fingerprint: String {
        var bytes = Array("warrant-rule-v1".utf8)
        func field(_ text: String) { JoinRule.appendField(text, to: &bytes) }
        field(issuer)
        field(spiffeIDTemplate)
        field(String(ttlMaxSeconds))
        field(String(maxLifetimeSeconds))
        // One condition per claim (they are a mapping's keys).
        for condition in conditions.sorted(by: { $0.claim.utf8.lexicographicallyPrecedes($1.claim.utf8) }) {
            // Any value may match, in any order; a glob without '*' matches itself alone.
            let exact = condition.op != .glob && condition.op != .notGlob || !condition.values.contains { $0.utf8.contains(0x2A) }
            let kind = (exact ? "in" : "glob") + (condition.op.negated ? "-not" : "")
            let values = Set(condition.values.map { Array($0.utf8) }).sorted { $0.lexicographicallyPrecedes($1) }
            field(condition.claim)
            field(kind)
            field(String(values.count))
            for value in values { field(String(decoding: value, as: UTF8.self)) }
        }
        return Hex.encode(Array(SHA256.hash(data: bytes).prefix(8)))
    }

    /// `text`'s UTF-8 after its length (4 bytes, big-endian): fields so
    /// written cannot run into one another.
    static func appendField(_ text: String, to bytes: inout [UInt8]) {
        let utf8 = Array(text.utf8)
        withUnsafeBytes(of: UInt32(utf8.count).bigEndian) { bytes += $0 }
        bytes += utf8
    }

    /// The `issuer` a rule document names, if it reads that far.
    public static func issuerName(in document: String) throws(PolicyError) -> String? {
        try YAMLSection.parse(document, keys: nil).optionalString("issuer")
    }

    static func condition(_ claim: String, _ node: Node, _ path: String) throws(PolicyError) -> Condition {
        let condition: Condition
        if node.scalar != nil {
            condition = Condition(claim: claim, op: .equals, values: [try YAMLSection.scalar(node, path)])
        } else if node.sequence != nil {
            condition = Condition(claim: claim, op: .oneOf, values: try YAMLSection.strings(node, path))
        } else {
            let operators = Set(Condition.Operator.allCases.map(\.rawValue))
            let section = try YAMLSection(node, path, keys: operators)
            guard section.keys.count == 1, let name = section.keys.first, let op = Condition.Operator(rawValue: name),
                  let value = section.node(name) else {
                throw PolicyError(path: path, problem: "give exactly one of \(operators.sorted().joined(separator: ", "))")
            }
            let values: [String]
            switch op {
            case .equals, .notEquals, .glob, .notGlob:
                values = value.sequence != nil && (op == .glob || op == .notGlob)
                    ? try YAMLSection.strings(value, section.path(name)) : [try YAMLSection.scalar(value, section.path(name))]
            case .oneOf, .notOneOf:
                values = try YAMLSection.strings(value, section.path(name))
            }
            condition = Condition(claim: claim, op: op, values: values)
        }
        guard !condition.values.isEmpty, condition.values.count <= Self.valuesMax else {
            throw PolicyError(path: path, problem: "needs 1 to \(Self.valuesMax) values")
        }
        for value in condition.values where value.utf8.count > 1_024 {
            throw PolicyError(path: path, problem: "a value is longer than 1024 bytes")
        }
        return condition
    }

    static func checkClaimName(_ claim: String, method: JoinMethod?, path: String) throws(PolicyError) {
        guard let method, let known = Claims.known[method] else { return }
        guard known.contains(claim) else {
            let hint = known.sorted().first { $0.hasPrefix(claim) || claim.hasPrefix($0) }.map { " (did you mean '\($0)'?)" } ?? ""
            throw PolicyError(path: path, problem: "'\(claim)' is not a claim of \(Claims.platformName[method] ?? method.rawValue) tokens\(hint)")
        }
    }

    static func checkTemplate(_ template: String, method: JoinMethod?, trustDomain: String) throws(PolicyError) {
        guard template.hasPrefix("spiffe://\(trustDomain)/") else {
            throw PolicyError(path: "spiffe_id", problem: "must start with spiffe://\(trustDomain)/ (this cluster's trust domain)")
        }
        // Fill every placeholder with a plain value to check the shape.
        let sample: [String: String]
        do {
            // (A claim may be used more than once.)
            sample = Dictionary(try Template.placeholders(template).map { ($0, "x") }, uniquingKeysWith: { first, _ in first })
        } catch {
            throw PolicyError(path: "spiffe_id", problem: error.message)
        }
        for name in sample.keys { try checkClaimName(name, method: method, path: "spiffe_id") }
        do {
            _ = try Template.fill(template, claims: sample)
        } catch {
            throw PolicyError(path: "spiffe_id", problem: error.message)
        }
    }
}

/// SPIFFE ID templates: `{claim}` is replaced by the claim's value. A
/// missing claim, or a value with anything but letters, digits, '.', '-',
/// '_' and '/' (or that makes an empty or dot segment), denies: values are
/// never escaped into something else.
public enum Template {
    public struct Failure: Error, Sendable, Equatable {
        public var message: String
    }

    static func placeholders(_ template: String) throws(Failure) -> [String] {
        var names: [String] = []
        var rest = Substring(template)
        while let open = rest.firstIndex(of: "{") {
            guard let close = rest[open...].firstIndex(of: "}") else { throw Failure(message: "a '{' has no closing '}'") }
            let name = String(rest[rest.index(after: open)..<close])
            guard !name.isEmpty, name.utf8.allSatisfy({ (0x61...0x7A).contains($0) || (0x30...0x39).contains($0) || $0 == 0x5F || $0 == 0x2E }) else {
                throw Failure(message: "'{\(name)}' is not a claim name (lower-case letters, digits, '_' and '.')")
            }
            names.append(name)
            rest = rest[rest.index(after: close)...]
        }
        if rest.contains("}") { throw Failure(message: "a '}' has no opening '{'") }
        return names
    }

    public static func fill(_ template: String, claims: [String: String]) throws(Failure) -> SpiffeID {
        var out = ""
        var rest = Substring(template)
        while let open = rest.firstIndex(of: "{"), let close = rest[open...].firstIndex(of: "}") {
            out += rest[..<open]
            let name = String(rest[rest.index(after: open)..<close])
            guard let value = claims[name] else { throw Failure(message: "the token has no '\(name)' claim for the SPIFFE ID") }
            guard !value.isEmpty, value.utf8.count <= 255,
                  value.utf8.allSatisfy({ (0x61...0x7A).contains($0) || (0x41...0x5A).contains($0) || (0x30...0x39).contains($0)
                      || $0 == 0x2E || $0 == 0x2D || $0 == 0x5F || $0 == 0x2F }) else {
                throw Failure(message: "the claim '\(name)' (\"\(value.prefix(64))\") is not valid in a SPIFFE ID path; letters, digits, '.', '-', '_' and '/' only")
            }
            out += value
            rest = rest[rest.index(after: close)...]
        }
        out += rest
        do {
            return try SpiffeID(parsing: out)
        } catch {
            throw Failure(message: "the SPIFFE ID \"\(out.prefix(128))\" is not valid: \(error)")
        }
    }
}

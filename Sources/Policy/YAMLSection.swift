import Yams

/// A problem in a policy document: where (a dotted path) and what.
public struct PolicyError: Error, Sendable, Equatable, CustomStringConvertible {
    public var path: String
    public var problem: String
    public init(path: String, problem: String) {
        self.path = path
        self.problem = problem
    }
    public var description: String { path.isEmpty ? problem : "\(path): \(problem)" }
}

/// A YAML (or JSON) mapping read with its path: only the keys given are
/// allowed, a key appearing twice is an error, and every accessor names
/// the path in its error.
struct YAMLSection {
    let path: String
    let mapping: Node.Mapping

    static func parse(_ text: String, keys: Set<String>?) throws(PolicyError) -> YAMLSection {
        guard text.utf8.count <= 256 << 10 else { throw PolicyError(path: "", problem: "the document is larger than 256 KiB") }
        let root: Node?
        do {
            root = try Yams.compose(yaml: text)
        } catch {
            throw PolicyError(path: "", problem: "not valid YAML or JSON: \(error)")
        }
        guard let root else { throw PolicyError(path: "", problem: "the document is empty") }
        return try YAMLSection(root, "", keys: keys)
    }

    init(_ node: Node, _ path: String, keys: Set<String>?) throws(PolicyError) {
        self.path = path
        guard let mapping = node.mapping else { throw PolicyError(path: path, problem: "must be a mapping of keys to values") }
        var seen = Set<String>()
        for key in mapping.keys {
            guard let name = key.scalar?.string else { throw PolicyError(path: path, problem: "keys must be plain strings") }
            if let keys, !keys.contains(name) {
                throw PolicyError(path: path, problem: "unknown key '\(name)' (expected one of: \(keys.sorted().joined(separator: ", ")))")
            }
            guard seen.insert(name).inserted else { throw PolicyError(path: path, problem: "the key '\(name)' appears twice") }
        }
        self.mapping = mapping
    }

    var keys: [String] { mapping.keys.compactMap { $0.scalar?.string } }

    func path(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    func node(_ key: String) -> Node? { mapping[key] }

    func section(_ key: String, keys: Set<String>?) throws(PolicyError) -> YAMLSection? {
        guard let node = mapping[key] else { return nil }
        return try YAMLSection(node, path(key), keys: keys)
    }

    func string(_ key: String) throws(PolicyError) -> String {
        guard let value = try optionalString(key) else { throw PolicyError(path: path(key), problem: "is missing") }
        return value
    }

    func optionalString(_ key: String) throws(PolicyError) -> String? {
        guard let node = mapping[key] else { return nil }
        return try Self.scalar(node, path(key))
    }

    static func scalar(_ node: Node, _ path: String) throws(PolicyError) -> String {
        guard let scalar = node.scalar else { throw PolicyError(path: path, problem: "must be a string") }
        guard !scalar.string.isEmpty else { throw PolicyError(path: path, problem: "must not be empty") }
        return scalar.string
    }

    func strings(_ key: String) throws(PolicyError) -> [String]? {
        guard let node = mapping[key] else { return nil }
        return try Self.strings(node, path(key))
    }

    static func strings(_ node: Node, _ path: String) throws(PolicyError) -> [String] {
        guard let sequence = node.sequence else { throw PolicyError(path: path, problem: "must be a list of strings") }
        var values: [String] = []
        for (index, item) in sequence.enumerated() { values.append(try scalar(item, "\(path)[\(index)]")) }
        return values
    }

    func integer(_ key: String, in range: ClosedRange<Int64>, default fallback: Int64) throws(PolicyError) -> Int64 {
        guard let node = mapping[key] else { return fallback }
        guard let text = node.scalar?.string, let value = Int64(text) else { throw PolicyError(path: path(key), problem: "must be an integer") }
        guard range.contains(value) else { throw PolicyError(path: path(key), problem: "\(value) is outside \(range.lowerBound)...\(range.upperBound)") }
        return value
    }
}
